"""Outputs to S3: background checkpoint uploads, manifest last, resume from S3, retention, status,
finalize."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.artifacts import open_output
from kubetune.trainer.artifacts.client import StorageError
from kubetune.trainer.artifacts.output import MANIFEST_NAME
from kubetune.trainer.artifacts.s3output import S3OutputSession, shards_marker_name
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import DELAY_S, S3Env


def _write_checkpoint(root: Path, step: int, size: int = 200_000) -> Path:
    path = root / f"checkpoint-{step}"
    (path / "sub").mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(hashlib.sha256(str(step).encode()).digest() * (size // 32))
    (path / "sub" / "state.json").write_text(json.dumps({"step": step}))
    return path


def _session(s3: S3Env, prefix: str = "runs/a", settings: StorageSpec | None = None, **kw) -> S3OutputSession:
    if "status_interval" in kw:
        return S3OutputSession(s3.uri(prefix), settings or s3.settings(), **kw)
    session = open_output(s3.uri(prefix), settings or s3.settings(), **kw)
    assert isinstance(session, S3OutputSession)
    return session


@pytest.mark.slow  # > 1 s
def test_checkpoint_uploads_in_background_with_manifest_last(s3: S3Env) -> None:
    session = _session(s3)
    assert str(session.local_dir).startswith(str(s3.cache))
    ckpt = _write_checkpoint(session.local_dir, 10)
    s3.proxy.add_fault("delay", times=1, method="PUT", path_contains="checkpoint-10/model.safetensors")
    started = time.monotonic()
    session.checkpoint_saved(ckpt, 10)
    assert time.monotonic() - started < DELAY_S / 2, "checkpoint_saved blocked on the upload"
    session.wait()

    puts = [r.path for r in s3.proxy.requests if r.method == "PUT" and "checkpoint-10/" in r.path]
    assert puts[-1].endswith(f"checkpoint-10/{MANIFEST_NAME}")
    assert len(puts) == 3
    manifest = json.loads(s3.get(f"runs/a/checkpoint-10/{MANIFEST_NAME}"))
    assert manifest["step"] == 10
    body = s3.get("runs/a/checkpoint-10/model.safetensors")
    assert manifest["files"]["model.safetensors"] == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert set(manifest["files"]) == {"model.safetensors", "sub/state.json"}
    assert (ckpt / MANIFEST_NAME).is_file()  # complete locally too
    assert session.last_checkpoint_uri == s3.uri("runs/a/checkpoint-10")
    session.finalize()
    session.close()


@pytest.mark.slow  # > 1 s
def test_resume_from_s3_on_empty_disk_ignores_incomplete(s3: S3Env, tmp_path: Path) -> None:
    first = _session(s3)
    for step in (10, 20):
        first.checkpoint_saved(_write_checkpoint(first.local_dir, step), step)
    first.finalize()
    first.close()
    # A run killed mid-upload: files of checkpoint-30 but no manifest.
    s3.put("runs/a/checkpoint-30/model.safetensors", b"partial")
    # A corrupt one: manifest present, sizes right, content not (must fail verification).
    s3.put("runs/a/checkpoint-40/model.safetensors", b"x" * 8)
    s3.put(
        f"runs/a/checkpoint-40/{MANIFEST_NAME}",
        json.dumps({"step": 40, "files": {"model.safetensors": {"size": 8, "sha256": "0" * 64}}}),
    )

    fresh = _session(s3, settings=s3.settings(cacheDir=str(tmp_path / "empty-disk")))
    assert not any(fresh.local_dir.iterdir())
    latest = fresh.latest_checkpoint()
    assert latest == fresh.local_dir / "checkpoint-20"
    original = _write_checkpoint(tmp_path / "expected", 20)
    assert (latest / "model.safetensors").read_bytes() == (original / "model.safetensors").read_bytes()
    assert json.loads((latest / "sub" / "state.json").read_text()) == {"step": 20}
    assert (latest / MANIFEST_NAME).is_file()
    assert not list(fresh.local_dir.glob(".kubetune-*"))  # no staging leftovers
    assert fresh.last_checkpoint_uri == s3.uri("runs/a/checkpoint-20")

    removed = fresh.remove_incomplete_checkpoints()
    assert set(removed) == {s3.uri("runs/a/checkpoint-30"), s3.uri("runs/a/checkpoint-40")}
    assert not s3.keys("runs/a/checkpoint-30") and not s3.keys("runs/a/checkpoint-40")
    assert s3.keys("runs/a/checkpoint-10") and s3.keys("runs/a/checkpoint-20")
    # A second call finds the local copy and downloads nothing more.
    gets = s3.proxy.count("GET", "/checkpoint-20/", objects_only=True)
    assert fresh.latest_checkpoint() == latest
    assert s3.proxy.count("GET", "/checkpoint-20/", objects_only=True) == gets
    fresh.close()


def test_no_checkpoint_anywhere(s3: S3Env) -> None:
    session = _session(s3, "runs/empty")
    assert session.latest_checkpoint() is None
    session.close()


@pytest.mark.slow  # > 1 s
def test_retention_in_s3_survives_local_rotation(s3: S3Env) -> None:
    session = _session(s3, keep_last=2)
    s3.proxy.add_fault("delay", times=1, method="PUT", path_contains="checkpoint-1/")
    for step in (1, 2, 3, 4):
        path = _write_checkpoint(session.local_dir, step)
        session.checkpoint_saved(path, step)
        if step >= 3:  # what transformers' save_total_limit=2 does, possibly mid-upload
            shutil.rmtree(session.local_dir / f"checkpoint-{step - 2}")
    session.finalize()
    names = sorted({key.split("/")[2] for key in s3.keys("runs/a/checkpoint-")})
    assert names == ["checkpoint-3", "checkpoint-4"]
    for step in (3, 4):
        manifest = json.loads(s3.get(f"runs/a/checkpoint-{step}/{MANIFEST_NAME}"))
        assert set(manifest["files"]) == {"model.safetensors", "sub/state.json"}
    session.close()


def test_finalize_uploads_outputs_and_status(s3: S3Env) -> None:
    session = _session(s3, status_interval=3600)
    session.checkpoint_saved(_write_checkpoint(session.local_dir, 5), 5)
    (session.local_dir / "adapter").mkdir()
    (session.local_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (session.local_dir / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    (session.local_dir / "loss.png").write_bytes(b"\x89PNG fake")
    session.write_status({"phase": "Running", "step": 1}, force=True)
    status = json.loads(s3.get("runs/a/status.json"))
    assert status["phase"] == "Running" and status["step"] == 1
    session.write_status({"phase": "Running", "step": 2})  # throttled: not uploaded yet
    time.sleep(0.2)
    assert json.loads(s3.get("runs/a/status.json"))["step"] == 1
    assert json.loads((session.local_dir / "status.json").read_text())["step"] == 2

    session.finalize()
    assert s3.get("runs/a/adapter/adapter_model.safetensors") == b"w" * 1000
    assert s3.get("runs/a/metrics.jsonl") == b'{"step": 5, "loss": 1.0}\n'
    assert s3.get("runs/a/loss.png") == b"\x89PNG fake"
    final = json.loads(s3.get("runs/a/status.json"))
    assert final["step"] == 2 and final["lastCheckpoint"] == s3.uri("runs/a/checkpoint-5")
    assert not [k for k in s3.keys("runs/a/") if ".kubetune-" in k or k.endswith(".tmp")]
    session.close()


@pytest.mark.slow  # > 1 s
def test_finalize_waits_for_a_slow_checkpoint_upload(s3: S3Env) -> None:
    session = _session(s3)
    s3.proxy.add_fault("delay", times=1, method="PUT", path_contains="checkpoint-7/model")
    session.checkpoint_saved(_write_checkpoint(session.local_dir, 7), 7)
    assert not s3.keys(f"runs/a/checkpoint-7/{MANIFEST_NAME}")
    session.finalize()
    assert s3.keys(f"runs/a/checkpoint-7/{MANIFEST_NAME}")
    session.close()


def test_finalize_raises_when_uploads_fail(s3: S3Env) -> None:
    session = _session(s3, settings=s3.settings(maxAttempts=2))
    s3.proxy.add_fault("500", times=None, method="PUT", path_contains="checkpoint-9/model")
    session.checkpoint_saved(_write_checkpoint(session.local_dir, 9), 9)
    (session.local_dir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(StorageError) as info:
        session.finalize()
    assert s3.uri("runs/a/checkpoint-9") in str(info.value)
    assert not s3.keys(f"runs/a/checkpoint-9/{MANIFEST_NAME}")  # never marked complete
    assert s3.get("runs/a/metrics.jsonl") == b"{}\n"  # the rest still went up
    session.close()


def test_resumed_local_checkpoint_missing_in_s3_is_uploaded(s3: S3Env) -> None:
    session = _session(s3)
    path = _write_checkpoint(session.local_dir, 3)
    from kubetune.trainer.artifacts.output import write_manifest

    write_manifest(path, 3)  # complete locally, never reached S3 (killed mid-upload)
    assert session.latest_checkpoint() == path
    session.finalize()
    assert s3.keys(f"runs/a/checkpoint-3/{MANIFEST_NAME}")
    session.close()


def test_phase_change_uploads_status_at_once_with_the_s3_checkpoint(s3: S3Env) -> None:
    session = _session(s3, status_interval=3600)
    session.write_status({"phase": "Running", "step": 1}, force=True)
    path = _write_checkpoint(session.local_dir, 4)
    session.checkpoint_saved(path, 4)
    session.wait()
    # Throttled, but the phase changed: uploaded now. A local lastCheckpoint is replaced by the URI.
    session.write_status({"phase": "Failed", "step": 4, "lastCheckpoint": str(path), "message": "boom"})
    remote = json.loads(s3.get("runs/a/status.json"))
    assert remote["phase"] == "Failed" and remote["message"] == "boom"
    assert remote["lastCheckpoint"] == s3.uri("runs/a/checkpoint-4")
    session.close()


def test_upload_directory(s3: S3Env, tmp_path: Path) -> None:
    from kubetune.trainer.artifacts.transfer import upload_directory

    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "a.json").write_text("{}")
    (tmp_path / "m" / "sub" / "b.bin").write_bytes(b"b" * 10)
    assert upload_directory(tmp_path / "m", s3.uri("exports/m"), s3.settings()) == (2, 12)
    assert s3.keys("exports/") == ["exports/m/a.json", "exports/m/sub/b.bin"]


# -- multi-node checkpoints: every node uploads its own files, rank 0 the manifest last ----------

SHARD0, SHARD1 = "global_step10/zero_pp_rank_0_optim_states.pt", "global_step10/zero_pp_rank_1_optim_states.pt"


def _node_session(s3: S3Env, node: str, **settings) -> S3OutputSession:
    """One node's session: same output prefix, its own disk (cache directory)."""
    return S3OutputSession(s3.uri("runs/a"), s3.settings(cacheDir=str(s3.cache.parent / node), **settings))


def _node_checkpoint(session: S3OutputSession, files: dict[str, bytes]) -> Path:
    path = session.local_dir / "checkpoint-10"
    for rel, body in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(body)
    return path


@pytest.mark.slow  # > 1 s
def test_a_multi_node_checkpoint_is_complete_only_with_every_nodes_files(s3: S3Env) -> None:
    node0, node1 = _node_session(s3, "node0"), _node_session(s3, "node1")
    path0 = _node_checkpoint(node0, {"model.safetensors": b"m" * 5000, SHARD0: b"0" * 3000})
    path1 = _node_checkpoint(node1, {SHARD1: b"1" * 3000, "rng_state_1.pth": b"r1"})
    # Left over from an earlier attempt that saved this step: a marker with another token.
    s3.put(f"runs/a/checkpoint-10/{shards_marker_name(1)}", json.dumps({"token": "old", "files": {}}))
    s3.proxy.add_fault("delay", times=1, method="PUT", path_contains=SHARD1.split("/")[1])

    node0.checkpoint_saved(path0, 10, shards_from=[1], token="t1")
    node1.checkpoint_shards_saved(path1, 10, [SHARD1, "rng_state_1.pth"], rank=1, token="t1")
    node1.wait_shards()
    node0.finalize()

    puts = [r.path for r in s3.proxy.requests if r.method == "PUT" and "checkpoint-10/" in r.path]
    assert puts[-1].endswith(MANIFEST_NAME), puts  # after node 1's (delayed) files and marker
    assert puts.index(next(p for p in puts if p.endswith(shards_marker_name(1)))) > puts.index(
        next(p for p in puts if p.endswith(SHARD1.split("/")[1]))
    )
    manifest = json.loads(s3.get(f"runs/a/checkpoint-10/{MANIFEST_NAME}"))
    assert set(manifest["files"]) == {"model.safetensors", SHARD0, SHARD1, "rng_state_1.pth"}
    assert manifest["files"][SHARD1] == {"size": 3000, "sha256": hashlib.sha256(b"1" * 3000).hexdigest()}
    assert not (path0 / MANIFEST_NAME).exists()  # not complete on node 0's disk alone
    assert node0.last_checkpoint_uri == s3.uri("runs/a/checkpoint-10")

    # Any node resuming on an empty disk gets the whole checkpoint.
    fresh = _node_session(s3, "node2")
    latest = fresh.latest_checkpoint()
    assert latest is not None and (latest / SHARD1).read_bytes() == b"1" * 3000
    assert (latest / SHARD0).read_bytes() == b"0" * 3000
    for session in (node0, node1, fresh):
        session.close()


@pytest.mark.slow  # > 1 s
def test_a_node_that_fails_its_upload_leaves_the_checkpoint_incomplete(s3: S3Env) -> None:
    node0, node1 = _node_session(s3, "node0"), _node_session(s3, "node1", maxAttempts=2)
    path0 = _node_checkpoint(node0, {"model.safetensors": b"m" * 5000})
    path1 = _node_checkpoint(node1, {SHARD1: b"1" * 3000})
    s3.proxy.add_fault("500", times=None, method="PUT", path_contains=SHARD1.split("/")[1])

    node1.checkpoint_shards_saved(path1, 10, [SHARD1], rank=1, token="t1")
    node0.checkpoint_saved(path0, 10, shards_from=[1], token="t1")
    with pytest.raises(StorageError):
        node1.wait_shards()
    with pytest.raises(StorageError) as info:  # at once: node 1's marker carries its error
        node0.finalize()
    assert "rank 1" in str(info.value)
    assert not s3.keys(f"runs/a/checkpoint-10/{MANIFEST_NAME}")
    node0.close()
    node1.close()


@pytest.mark.slow  # > 1 s
def test_a_node_that_never_reports_leaves_the_checkpoint_incomplete(s3: S3Env) -> None:
    node0 = S3OutputSession(s3.uri("runs/a"), s3.settings(), shards_timeout=1.0)
    path0 = _node_checkpoint(node0, {"model.safetensors": b"m" * 5000})
    node0.checkpoint_saved(path0, 10, shards_from=[1], token="t1")
    with pytest.raises(StorageError, match="did not upload"):
        node0.finalize()
    assert not s3.keys(f"runs/a/checkpoint-10/{MANIFEST_NAME}")
    node0.close()


@pytest.mark.slow  # > 1 s
def test_other_nodes_rotate_their_own_uploaded_checkpoints(s3: S3Env) -> None:
    """Rank 0's session rotates only rank 0's disk: every other node's uploader
    deletes its own checkpoint directories beyond `keep_last`, once uploaded and older than the
    newest complete checkpoint; never one it did not upload, never the newest complete one."""

    def node(name: str) -> S3OutputSession:
        return S3OutputSession(s3.uri("runs/a"), s3.settings(cacheDir=str(s3.cache.parent / name)), keep_last=2)

    def local(session: S3OutputSession) -> list[str]:
        return sorted((p.name for p in session.local_dir.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))

    node0, node1 = node("node0"), node("node1")
    stale = node1.local_dir / "checkpoint-5"  # from an earlier attempt: never uploaded by this session
    stale.mkdir(parents=True)
    (stale / "rng_state_1.pth").write_bytes(b"old")

    def save(step: int, *, complete: bool = True) -> None:
        files = {f"global_step{step}/zero_pp_rank_1_optim_states.pt": b"1" * 100, "rng_state_1.pth": b"r1"}
        path1 = node1.local_dir / f"checkpoint-{step}"
        for rel, body in files.items():
            (path1 / rel).parent.mkdir(parents=True, exist_ok=True)
            (path1 / rel).write_bytes(body)
        node1.checkpoint_shards_saved(path1, step, sorted(files), rank=1, token=f"t{step}")
        node1.wait_shards()  # rotation ran after the upload (this step's manifest not there yet)
        if complete:
            path0 = node0.local_dir / f"checkpoint-{step}"
            path0.mkdir(parents=True)
            (path0 / "model.safetensors").write_bytes(b"m" * 100)
            node0.checkpoint_saved(path0, step, shards_from=[1], token=f"t{step}")
            node0.wait()
            assert s3.keys(f"runs/a/checkpoint-{step}/{MANIFEST_NAME}")

    save(10)
    save(20)
    assert local(node1) == ["checkpoint-5", "checkpoint-10", "checkpoint-20"]  # 10 and 20 are the newest 2
    save(30)  # complete in S3: 10, 20; the newest 2 locally: 20, 30
    assert local(node1) == ["checkpoint-5", "checkpoint-20", "checkpoint-30"]
    save(40)
    assert local(node1) == ["checkpoint-5", "checkpoint-30", "checkpoint-40"]
    assert local(node0) == ["checkpoint-30", "checkpoint-40"]  # rank 0's session rotates its own disk

    node1.keep_last = 1
    save(50, complete=False)  # rank 0 never completes it: 40 stays the newest complete checkpoint
    assert local(node1) == ["checkpoint-5", "checkpoint-40", "checkpoint-50"]
    node0.close()
    node1.close()


def _metrics(*steps: int) -> str:
    return "".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in steps)


@pytest.mark.slow  # > 1 s
def test_run_logs_travel_with_the_checkpoint_and_reach_the_prefix_before_its_manifest(s3: S3Env) -> None:
    """A kill right after the manifest must not cost the records logged up to the checkpoint."""
    session = _session(s3)
    (session.local_dir / "metrics.jsonl").write_text(_metrics(1, 2, 3))
    session.checkpoint_saved(_write_checkpoint(session.local_dir, 3), 3)
    with (session.local_dir / "metrics.jsonl").open("a") as handle:
        handle.write(_metrics(4))  # logged after the save: not part of checkpoint-3
    session.wait()
    puts = [r.path for r in s3.proxy.requests if r.method == "PUT"]
    logs_put = puts.index(f"/{s3.bucket}/runs/a/metrics.jsonl")
    assert logs_put < puts.index(f"/{s3.bucket}/runs/a/checkpoint-3/{MANIFEST_NAME}")
    assert s3.get("runs/a/metrics.jsonl").decode() == _metrics(1, 2, 3)
    manifest = json.loads(s3.get(f"runs/a/checkpoint-3/{MANIFEST_NAME}"))
    assert "kubetune-logs/metrics.jsonl" in manifest["files"]
    session.close()


@pytest.mark.slow  # > 1 s
def test_a_lost_log_upload_loses_no_records_on_resume(s3: S3Env) -> None:
    """The prefix's metrics.jsonl never lands (killed, or refused): a fresh disk resuming from
    checkpoint-3 still gets every record up to step 3, from the checkpoint's own copy, and none
    of the steps logged after it, which the resumed run logs again."""
    first = _session(s3)
    (first.local_dir / "metrics.jsonl").write_text(_metrics(1, 2, 3))
    s3.proxy.add_fault("403", times=None, method="PUT", path_contains="/runs/a/metrics.jsonl")
    first.checkpoint_saved(_write_checkpoint(first.local_dir, 3), 3)
    first.wait()
    first.close()
    assert s3.keys(f"runs/a/checkpoint-3/{MANIFEST_NAME}") and not s3.keys("runs/a/metrics.jsonl")

    second = S3OutputSession(s3.uri("runs/a"), s3.settings(cacheDir=str(s3.cache.parent / "fresh-disk")))
    (second.local_dir / "metrics.jsonl").write_text(_metrics(1, 2, 3, 4, 5))  # a stale local copy
    checkpoint = second.latest_checkpoint()
    assert checkpoint is not None and checkpoint.name == "checkpoint-3"
    second.rewind_run_logs(checkpoint)
    assert (second.local_dir / "metrics.jsonl").read_text() == _metrics(1, 2, 3)
    second.close()
