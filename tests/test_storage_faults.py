"""Failure behaviour: transient faults are retried, permanent ones fail fast and clearly, no
credential value leaks, and large files go multipart and come back identical."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.uri import S3Uri
from kubetune.trainer.artifacts import localize, open_output
from kubetune.trainer.artifacts.transfer import Transfers
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import SECRETS, S3Env


def _no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


@pytest.mark.slow  # > 1 s: retries with backoff
def test_transient_faults_are_retried(s3: S3Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s3.put("m/config.json", '{"x": 1}')
    s3.put("m/weights.bin", os.urandom(300_000))
    proxy = s3.proxy
    proxy.add_fault("503", times=2, method="GET", path_contains="/m/config.json")
    proxy.add_fault("drop", times=1, method="GET", path_contains="/m/weights.bin")
    proxy.add_fault("truncate", times=1, method="GET", path_contains="/m/weights.bin")
    proxy.add_fault("500", times=1, query_contains="list-type")
    path = localize(s3.uri("m"), s3.settings(), field="model.path")
    assert (path / "weights.bin").read_bytes() == s3.get("m/weights.bin")
    assert (path / "config.json").read_text() == '{"x": 1}'

    session = open_output(s3.uri("out"), s3.settings())
    ckpt = session.local_dir / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / "w.bin").write_bytes(os.urandom(100_000))
    proxy.add_fault("503", times=2, method="PUT", path_contains="checkpoint-1/w.bin")
    proxy.add_fault("drop", times=1, method="PUT", path_contains="checkpoint-1/kubetune-manifest.json")
    session.checkpoint_saved(ckpt, 1)
    session.finalize()
    assert s3.get("out/checkpoint-1/w.bin") == (ckpt / "w.bin").read_bytes()
    assert json.loads(s3.get("out/checkpoint-1/kubetune-manifest.json"))["step"] == 1
    session.close()

    modes = sorted(mode for mode, _ in proxy.injected)
    assert modes == ["500", "503", "503", "503", "503", "drop", "drop", "truncate"]
    _no_secrets(caplog.text)


def test_missing_bucket_fails_fast_and_names_the_uri(s3: S3Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = s3.settings(maxAttempts=8)
    started = time.monotonic()
    with pytest.raises(SpecError) as info:
        localize("s3://no-such-bucket-kt/data.jsonl", settings, field="data.datasets[0].path")
    message = str(info.value)
    assert "s3://no-such-bucket-kt/data.jsonl" in message and "does not exist" in message
    assert message.startswith("data.datasets[0].path:")
    with pytest.raises(SpecError) as out:
        open_output("s3://no-such-bucket-kt/runs/x", settings)
    assert "s3://no-such-bucket-kt/runs/x" in str(out.value) and "output.path" in str(out.value)
    assert time.monotonic() - started < 3, "a permanent error must not be retried"
    assert out.value.exit_code == 2
    _no_secrets(message, str(out.value), caplog.text)


def test_access_denied_fails_fast_without_secrets(s3: S3Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s3.put("private/model.bin", b"x")
    s3.proxy.add_fault("403", times=None, path_contains=f"/{s3.bucket}")
    started = time.monotonic()
    with pytest.raises(SpecError) as info:
        localize(s3.uri("private/model.bin"), s3.settings(), field="model.path")
    with pytest.raises(SpecError) as out:
        open_output(s3.uri("runs/denied"), s3.settings())
    assert time.monotonic() - started < 3
    assert s3.uri("private/model.bin") in str(info.value) and "access denied" in str(info.value)
    assert s3.uri("runs/denied/") in str(out.value) and "access denied" in str(out.value)
    assert len(s3.proxy.injected) == 2  # one request each: no retries
    _no_secrets(str(info.value), str(out.value), caplog.text)


def test_status_and_errors_never_carry_credentials(s3: S3Env) -> None:
    session = open_output(s3.uri("runs/s"), s3.settings())
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    session.write_status({"phase": "Failed", "message": f"boom with {secret} inside"}, force=True)
    remote = s3.get("runs/s/status.json").decode()
    assert json.loads(remote)["phase"] == "Failed" and "***" in remote
    _no_secrets(remote, (session.local_dir / "status.json").read_text())
    session.close()


@pytest.mark.slow  # > 1 s: 200 MB through S3
def test_200mb_file_multipart_round_trip(s3: S3Env, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with source.open("wb") as handle:
        for _ in range(200):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            handle.write(block)
    settings = s3.settings(multipartThresholdMb=64, maxConcurrency=8)
    with Transfers(settings) as transfers:
        uploaded = transfers.upload_file(source, S3Uri(s3.bucket, "big/big.bin"))
    assert uploaded.etag.endswith("-13")  # 200 MiB in 16 MiB parts, verified against S3's ETag
    part_puts = [r for r in s3.proxy.requests if r.method == "PUT" and "partNumber" in r.query]
    assert len(part_puts) == 13
    source.unlink()  # the disk is tight; the copy must come from S3

    local = localize(s3.uri("big/big.bin"), settings, field="model.path")
    check = hashlib.sha256()
    with local.open("rb") as handle:
        while block := handle.read(1 << 22):
            check.update(block)
    assert check.hexdigest() == digest.hexdigest()
    ranged = [r for r in s3.proxy.requests if r.method == "GET" and r.path.endswith("/big/big.bin")]
    assert len(ranged) > 1  # downloaded in parallel parts
