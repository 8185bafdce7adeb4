"""Issue 6's acceptance, end to end: `kubetune train` with model, data and output on S3 (moto's
server over real HTTP, real boto3, the fault-injecting proxy in between).

- the quickstart runs from and to S3 and a second run downloads nothing again;
- a run SIGKILLed while a checkpoint upload is in flight resumes on an empty disk from the last
  complete checkpoint, and S3 never holds a complete-looking checkpoint that is not whole;
- transient S3 faults are retried; a permanent one fails fast, clearly, without secrets;
- success is never reported while an output is not stored.
Each training subprocess gets its own empty cache (`KUBETUNE_CACHE`): a fresh pod's disk.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from kubetune.trainer.artifacts.output import MANIFEST_NAME
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import DELAY_S, SECRETS, S3Env

from .test_train import DEMO, cli, small_spec

pytestmark = pytest.mark.slow

MODEL_PREFIX = "models/tiny-llama"
DATA_KEY = "data/demo_alpaca.json"


@pytest.fixture
def inputs(s3: S3Env, tiny_model_dir: Path) -> S3Env:
    """The builtin tiny model and the demo data, uploaded to the test's bucket."""
    s3.upload_tree(tiny_model_dir, MODEL_PREFIX)
    s3.upload_tree(Path(DEMO), "data")
    s3.proxy.reset()
    return s3


def s3_args(s3: S3Env, output: str) -> list[str]:
    """`--set` overrides putting model, data and output on S3 behind the proxy."""
    sets = {
        "model.path": s3.uri(MODEL_PREFIX),
        "data.datasets.0.path": s3.uri(DATA_KEY),
        "output.path": s3.uri(output),
        "storage.endpointUrl": s3.proxy.url,
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def fresh_disk(tmp_path: Path, name: str) -> dict[str, str]:
    """Environment for a subprocess whose local disk (cache, staging) starts empty."""
    cache = tmp_path / name
    assert not cache.exists()
    return {"KUBETUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def finish(proc, timeout: float = 300) -> str:
    output, _ = proc.communicate(timeout=timeout)
    return output


def remote_checkpoints(s3: S3Env, prefix: str) -> dict[int, list[str]]:
    """{step: [keys]} of every checkpoint-N under `prefix` in S3, complete or not."""
    found: dict[int, list[str]] = {}
    for key in s3.keys(prefix.rstrip("/") + "/checkpoint-"):
        name = key[len(prefix.rstrip("/")) + 1 :].split("/")[0]
        found.setdefault(int(name.split("-")[1]), []).append(key)
    return found


def verify_checkpoint(s3: S3Env, prefix: str, step: int) -> dict:
    """The checkpoint's manifest, after checking every listed object against its size and SHA-256
    (and that no object is left out of it)."""
    base = f"{prefix.rstrip('/')}/checkpoint-{step}/"
    manifest = json.loads(s3.get(base + MANIFEST_NAME))
    assert manifest["step"] == step
    assert manifest["files"], base
    for rel, meta in manifest["files"].items():
        body = s3.get(base + rel)
        assert len(body) == meta["size"], base + rel
        assert hashlib.sha256(body).hexdigest() == meta["sha256"], base + rel
    listed = {key[len(base) :] for key in s3.keys(base)}
    assert listed == {*manifest["files"], MANIFEST_NAME}, base
    assert {"trainer_state.json", "model.safetensors"} <= set(manifest["files"]), base
    return manifest


def metrics_of(s3: S3Env, prefix: str) -> list[dict]:
    text = s3.get(f"{prefix}/metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# ---------------------------------------------------------------------------------------------


def test_quickstart_all_on_s3_then_second_run_reuses_the_cache(inputs: S3Env, tmp_path: Path) -> None:
    s3, proxy = inputs, inputs.proxy
    env = fresh_disk(tmp_path, "disk")
    proc = cli("train", "examples/quickstart.yaml", *s3_args(s3, "runs/quickstart"),
               "--set", "train.epochs=2", "--set", "checkpoint.everySteps=10", env=env)
    output = finish(proc)
    assert proc.returncode == 0, output[-4000:]
    no_secrets(output)

    keys = set(s3.keys("runs/quickstart/"))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "kubetune-spec.yaml", "metrics.jsonl", "loss.png", "status.json"):
        assert f"runs/quickstart/{name}" in keys, name
    assert not [k for k in keys if ".kubetune-" in k or k.endswith(".tmp")], keys
    status = json.loads(s3.get("runs/quickstart/status.json"))
    assert status["phase"] == "Succeeded", status
    assert status["outputUri"] == s3.uri("runs/quickstart")
    assert s3.get("runs/quickstart/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = yaml.safe_load(s3.get("runs/quickstart/kubetune-spec.yaml"))
    assert resolved["name"] == "quickstart" and resolved["model"]["path"] == s3.uri(MODEL_PREFIX)
    records = metrics_of(s3, "runs/quickstart")
    losses = [r["step"] for r in records if "loss" in r]
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    final_step = records[-1]["step"]
    assert losses and final_step >= losses[-1] >= 30  # 2 epochs of ~17 steps, logged every 10

    # Checkpoints: retention (keepLast: 2) applied in S3, each one whole and verified.
    checkpoints = remote_checkpoints(s3, "runs/quickstart")
    assert len(checkpoints) == 2, sorted(checkpoints)
    for step in checkpoints:
        verify_checkpoint(s3, "runs/quickstart", step)
    assert status["lastCheckpoint"] == s3.uri(f"runs/quickstart/checkpoint-{max(checkpoints)}")

    # The inputs were downloaded once, each object exactly once.
    model_keys = s3.keys(MODEL_PREFIX + "/")
    model_bytes = sum(len(s3.get(k)) for k in model_keys)
    assert proxy.count("GET", f"/{MODEL_PREFIX}/", objects_only=True) == len(model_keys)
    assert proxy.bytes_served(f"/{MODEL_PREFIX}/") >= model_bytes
    assert proxy.count("GET", f"/{DATA_KEY}", objects_only=True) == 1

    # Second run, same disk: the model and the data come from the cache, not from S3.
    proxy.reset()
    proc = cli("train", "examples/quickstart.yaml", *s3_args(s3, "runs/quickstart-2"),
               "--set", "train.maxSteps=2", env=env)
    output = finish(proc)
    assert proc.returncode == 0, output[-4000:]
    assert proxy.count("GET", f"/{MODEL_PREFIX}/", objects_only=True) == 0
    assert proxy.count("GET", f"/{DATA_KEY}", objects_only=True) == 0
    assert proxy.bytes_served(f"/{MODEL_PREFIX}/") + proxy.bytes_served(f"/{DATA_KEY}") == 0
    assert json.loads(s3.get("runs/quickstart-2/status.json"))["phase"] == "Succeeded"


def write_spec(tmp_path: Path, s3: S3Env, output: str, **overrides) -> Path:
    """A small training spec (see test_train.small_spec) with model, data and output on S3."""
    spec = small_spec(tmp_path, **overrides)
    spec["model"]["path"] = s3.uri(MODEL_PREFIX)
    spec["data"]["datasets"][0]["path"] = s3.uri(DATA_KEY)
    spec["output"]["path"] = s3.uri(output)
    spec["storage"] = {"endpointUrl": s3.proxy.url, **spec.get("storage", {})}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sigkill_during_checkpoint_upload_then_resume_on_an_empty_disk(inputs: S3Env, tmp_path: Path) -> None:
    s3, proxy = inputs, inputs.proxy
    run = "runs/killed"
    spec_path = write_spec(tmp_path, s3, run, train={"maxSteps": 30}, checkpoint={"everySteps": 5, "keepLast": 2},
                           data={"evalSize": 0})
    # Every PUT of checkpoint-15 is held back by the proxy: its upload is surely still running
    # (files sent, manifest not) when the process dies.
    held = proxy.add_fault("delay", times=None, method="PUT", path_contains=f"/{run}/checkpoint-15/")
    first = cli("train", str(spec_path), env=fresh_disk(tmp_path, "disk-1"))
    deadline = time.monotonic() + 240
    while not any(mode == "delay" for mode, _ in proxy.injected):
        assert first.poll() is None, finish(first)[-4000:]
        assert time.monotonic() < deadline, "the upload of checkpoint-15 never began"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    output = finish(first, timeout=60)
    assert first.returncode == -signal.SIGKILL, output[-4000:]
    held.times = 0
    # The PUTs the proxy held still land (a half-uploaded checkpoint): wait until the store has answered each.
    deadline = time.monotonic() + DELAY_S + 60
    while True:
        with proxy.lock:
            landed = all(request.status for mode, request in proxy.injected if mode == "delay")
        if landed:
            break
        assert time.monotonic() < deadline, "the PUTs the proxy held never reached the store"
        time.sleep(0.05)

    # Right after the crash: 5 and 10 are complete and whole, 15 has objects but no manifest.
    after_crash = remote_checkpoints(s3, run)
    assert sorted(after_crash) == [5, 10, 15], sorted(after_crash)
    for step in (5, 10):
        verify_checkpoint(s3, run, step)
    assert after_crash[15] and f"{run}/checkpoint-15/{MANIFEST_NAME}" not in after_crash[15]

    # Rerun on a fresh machine: nothing local, everything from S3.
    proxy.reset()
    second = cli("train", str(spec_path), env=fresh_disk(tmp_path, "disk-2"))
    output = finish(second)
    assert second.returncode == 0, output[-4000:]
    no_secrets(output)
    assert f"removing incomplete checkpoint {s3.uri(run + '/checkpoint-15')}" in output, output[-4000:]

    # It resumed from checkpoint-10 (downloaded from S3), not from the incomplete 15, nor from 0.
    records = metrics_of(s3, run)
    last_start = max(i for i, r in enumerate(records) if r.get("event") == "start")
    assert records[last_start]["resumedFrom"].endswith("checkpoint-10"), records[last_start]
    resumed_steps = [r["step"] for r in records[last_start:] if "loss" in r]
    assert resumed_steps and min(resumed_steps) == 11 and max(resumed_steps) == 30, resumed_steps
    assert records[-1]["event"] == "end" and records[-1]["step"] == 30
    # ... and the metrics cover the whole job: the killed attempt's records up to checkpoint-10
    # (uploaded with it) came back to the new disk, and the resumed attempt appended to them.
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["resumedFrom"] is None
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert proxy.count("GET", f"/{run}/checkpoint-10/", objects_only=True) >= 2
    assert proxy.count("GET", f"/{run}/checkpoint-15/", objects_only=True) == 0
    # The half-uploaded checkpoint was deleted before checkpoint-15 was written again.
    deletes = [i for i, r in enumerate(proxy.requests) if r.method == "POST" and "delete" in r.query]
    rewrites = [i for i, r in enumerate(proxy.requests) if r.method == "PUT" and f"/{run}/checkpoint-15/" in r.path]
    assert deletes and rewrites and deletes[0] < rewrites[0]

    status = json.loads(s3.get(f"{run}/status.json"))
    assert status["phase"] == "Succeeded" and status["step"] == 30, status
    assert status["lastCheckpoint"] == s3.uri(f"{run}/checkpoint-30")
    # Every checkpoint left in S3 is complete and verifies; retention kept the last two.
    final = remote_checkpoints(s3, run)
    assert sorted(final) == [25, 30], sorted(final)
    for step in final:
        verify_checkpoint(s3, run, step)
    assert f"{run}/model.safetensors" in s3.keys(run + "/")


def test_transient_faults_are_retried_and_a_wrong_bucket_fails_fast(inputs: S3Env, tmp_path: Path) -> None:
    s3, proxy = inputs, inputs.proxy
    run = "runs/faulty"
    spec_path = write_spec(tmp_path, s3, run, train={"maxSteps": 6}, checkpoint={"everySteps": 3, "keepLast": 3},
                           data={"evalSize": 0}, logging={"everySteps": 1, "samples": 0})
    faults = [
        proxy.add_fault("500", times=2, query_contains="list-type"),  # the first listings (output probe)
        proxy.add_fault("500", times=1, method="GET", path_contains=f"/{MODEL_PREFIX}/model.safetensors"),
        proxy.add_fault("drop", times=1, method="GET", path_contains=f"/{DATA_KEY}"),
        proxy.add_fault("truncate", times=1, method="GET", path_contains=f"/{MODEL_PREFIX}/tokenizer.json"),
        proxy.add_fault("503", times=1, method="PUT", path_contains=f"/{run}/checkpoint-3/model.safetensors"),
        proxy.add_fault("drop", times=1, method="PUT", path_contains=f"/{run}/checkpoint-6/{MANIFEST_NAME}"),
        proxy.add_fault("500", times=1, method="HEAD", path_contains=f"/{run}/checkpoint-6/"),
        proxy.add_fault("503", times=1, method="PUT", path_contains=f"/{run}/metrics.jsonl"),
        proxy.add_fault("drop", times=1, method="PUT", path_contains=f"/{run}/model.safetensors"),
        proxy.add_fault("500", times=1, method="PUT", path_contains=f"/{run}/status.json"),
    ]
    planned = sum(f.times or 0 for f in faults)
    proc = cli("train", str(spec_path), env=fresh_disk(tmp_path, "disk-1"))
    output = finish(proc)
    assert proc.returncode == 0, output[-4000:]
    no_secrets(output)
    assert not [f for f in faults if f.times], "a fault was never hit: the test no longer covers it"
    assert len(proxy.injected) == planned
    assert json.loads(s3.get(f"{run}/status.json"))["phase"] == "Succeeded"
    for step in (3, 6):
        verify_checkpoint(s3, run, step)
    local_model = tmp_path / "disk-1" / "s3" / s3.bucket / MODEL_PREFIX / "model.safetensors"
    assert local_model.read_bytes() == s3.get(f"{MODEL_PREFIX}/model.safetensors")  # the retried download is whole
    assert s3.get(f"{run}/metrics.jsonl").count(b'"loss"') == 6

    # A permanent error: the model's bucket does not exist. Exit code 2 at once, the URI named,
    # not retried, no secret even at debug log level.
    proxy.reset()
    wrong = f"s3://no-such-bucket-{s3.bucket}/{MODEL_PREFIX}"
    started = time.monotonic()
    proc = cli("train", str(spec_path), "--set", f"model.path={wrong}", "--set", f"output.path={s3.uri('runs/wrong')}",
               "--set", "logging.level=debug", env=fresh_disk(tmp_path, "disk-2"))
    output = finish(proc, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, output[-4000:]
    message = [line for line in output.splitlines() if line.startswith("kubetune: ")]
    assert message and wrong in message[-1] and "model.path" in message[-1] and "does not exist" in message[-1], output[-3000:]
    assert "Traceback" not in output
    assert proxy.count("GET", f"/no-such-bucket-{s3.bucket}") == 1  # one listing, no retries
    assert elapsed < 60
    assert "botocore" in output  # debug logs were on: the redaction was really tested
    no_secrets(output)


def test_a_failed_final_upload_is_never_reported_as_success(inputs: S3Env, tmp_path: Path) -> None:
    """Training does not report success until every upload has finished and been verified: when
    the final model cannot be stored, status.json says Failed (naming the object), not Succeeded."""
    from kubetune.trainer.api.specfile import validate_training
    from kubetune.trainer.artifacts.client import StorageError
    from kubetune.trainer.train.runner import run

    s3, proxy = inputs, inputs.proxy
    out = "runs/unlucky"
    spec = yaml.safe_load(write_spec(tmp_path, s3, out, train={"maxSteps": 2}, data={"evalSize": 0},
                                     logging={"everySteps": 1, "samples": 0}).read_text())
    spec["storage"].update(maxAttempts=2, cacheDir=str(tmp_path / "disk"))
    proxy.add_fault("500", times=None, method="PUT", path_contains=f"/{out}/model.safetensors")
    with pytest.raises(StorageError) as info:
        run(validate_training(spec))
    assert s3.uri(f"{out}/model.safetensors") in str(info.value)
    status = json.loads(s3.get(f"{out}/status.json"))
    assert status["phase"] == "Failed", status
    assert s3.uri(f"{out}/model.safetensors") in status["message"]
    assert f"{out}/metrics.jsonl" in s3.keys(out + "/")  # everything else was still stored
    no_secrets(str(info.value), json.dumps(status))
