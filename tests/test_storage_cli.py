"""`kubetune storage ls|cp|rm` against the moto server (through the CLI's argparse wiring)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.trainer.cli.storage import main
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import SECRETS, S3Env


def _cli(s3: S3Env, *argv: str) -> int:
    command, *rest = argv
    return main(["storage", command, "--endpoint-url", s3.proxy.url, "--path-style", *rest])


def test_cp_ls_rm_round_trip(s3: S3Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(b"\x01" * 70_000)
    single = tmp_path / "one.txt"
    single.write_text("one")

    assert _cli(s3, "cp", str(src), s3.uri("models/tiny")) == 0
    assert _cli(s3, "cp", str(single), s3.uri("data/")) == 0
    assert s3.keys() == ["data/one.txt", "models/tiny/config.json", "models/tiny/sub/weights.bin"]
    assert s3.get("models/tiny/sub/weights.bin") == b"\x01" * 70_000

    capsys.readouterr()
    assert _cli(s3, "ls", s3.uri("models/tiny")) == 0
    out = capsys.readouterr().out
    assert "PRE" in out and "sub/" in out and s3.uri("models/tiny/config.json") in out
    assert "weights.bin" not in out  # not recursive
    assert _cli(s3, "ls", "-r", s3.uri("models/")) == 0
    assert s3.uri("models/tiny/sub/weights.bin") in capsys.readouterr().out

    back = tmp_path / "back"
    assert _cli(s3, "cp", s3.uri("models/tiny"), str(back)) == 0
    assert (back / "sub" / "weights.bin").read_bytes() == b"\x01" * 70_000
    assert (back / "config.json").read_text() == '{"a": 1}'
    assert _cli(s3, "cp", s3.uri("data/one.txt"), str(tmp_path / "copy.txt")) == 0
    assert (tmp_path / "copy.txt").read_text() == "one"
    assert _cli(s3, "cp", s3.uri("models/tiny"), s3.uri("models/copy")) == 0
    assert s3.get("models/copy/sub/weights.bin") == b"\x01" * 70_000

    capsys.readouterr()
    assert _cli(s3, "rm", s3.uri("models/tiny")) == 2  # a prefix needs --recursive
    assert "--recursive" in capsys.readouterr().err
    assert _cli(s3, "rm", "--recursive", s3.uri("models/tiny")) == 0
    assert _cli(s3, "rm", s3.uri("data/one.txt")) == 0
    assert s3.keys() == ["models/copy/config.json", "models/copy/sub/weights.bin"]


def test_cli_errors_exit_2_with_the_uri(s3: S3Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(s3, "ls", s3.uri("missing/")) == 2
    assert s3.uri("missing/") in capsys.readouterr().err
    assert _cli(s3, "ls", "s3://no-such-bucket-kt/x") == 2
    err = capsys.readouterr().err
    assert "s3://no-such-bucket-kt/x" in err and "does not exist" in err
    assert _cli(s3, "cp", "/nonexistent/file", s3.uri("x")) == 2
    assert _cli(s3, "rm", s3.uri("nope.txt")) == 2
    err = capsys.readouterr().err
    assert "nope.txt" in err and not any(secret in err for secret in SECRETS)
    assert "Traceback" not in err
