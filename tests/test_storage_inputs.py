"""Inputs from S3: localize (file, prefix), the ETag-keyed cache, atomic downloads, streaming."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.artifacts import localize
from kubetune.trainer.artifacts.client import StorageError
from kubetune.trainer.artifacts.stream import iter_jsonl, iter_parquet_batches, list_files, open_stream
from kubetune.trainer.artifacts.transfer import PART_MARKER
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import S3Env


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_localize_single_file_then_cache_hit(s3: S3Env) -> None:
    s3.put("data/train.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    s3.put("data/train.jsonl.bak", "not me")
    settings = s3.settings()
    path = localize(s3.uri("data/train.jsonl"), settings, field="data.datasets[0].path")
    assert path.is_file() and path.read_text() == '{"text": "a"}\n{"text": "b"}\n'
    assert str(path).startswith(str(s3.cache))
    gets = s3.proxy.count("GET", "/data/train.jsonl", objects_only=True)
    assert gets == 1

    again = localize(s3.uri("data/train.jsonl"), settings, field="data.datasets[0].path")
    assert again == path
    assert s3.proxy.count("GET", "/data/train.jsonl", objects_only=True) == gets  # nothing downloaded


@pytest.mark.slow  # > 1 s
def test_localize_prefix_changed_and_removed_objects(s3: S3Env) -> None:
    s3.put("models/tiny/config.json", '{"a": 1}')
    s3.put("models/tiny/weights/model.safetensors", b"\x00" * 5000)
    s3.put("models/tiny/old.bin", b"old")
    s3.put("models/tiny-other/x.json", "{}")  # a sibling sharing the name's start: not included
    settings = s3.settings()
    root = localize(s3.uri("models/tiny"), settings, field="model.path")
    assert root.is_dir()
    assert _all_files(root) == ["config.json", "old.bin", "weights/model.safetensors"]
    first = s3.proxy.count("GET", "/models/tiny/", objects_only=True)
    assert first == 3

    # Unchanged: no object GETs at all (only the listing).
    assert localize(s3.uri("models/tiny/"), settings, field="model.path") == root
    assert s3.proxy.count("GET", "/models/tiny/", objects_only=True) == first

    # One object changes (new ETag), one disappears: exactly one download, the stale file goes.
    s3.put("models/tiny/config.json", '{"a": 2}')
    s3.client.delete_object(Bucket=s3.bucket, Key="models/tiny/old.bin")
    assert localize(s3.uri("models/tiny"), settings, field="model.path") == root
    assert s3.proxy.count("GET", "/models/tiny/", objects_only=True) == first + 1
    assert (root / "config.json").read_text() == '{"a": 2}'
    assert _all_files(root) == ["config.json", "weights/model.safetensors"]


def test_missing_location_is_a_spec_error(s3: S3Env) -> None:
    with pytest.raises(SpecError) as info:
        localize(s3.uri("nothing/here"), s3.settings(), field="model.path")
    message = str(info.value)
    assert message.startswith("model.path:") and s3.uri("nothing/here") in message
    with pytest.raises(SpecError, match="bucket"):
        localize("s3:///key", s3.settings(), field="model.path")


def test_interrupted_download_leaves_no_complete_looking_file(s3: S3Env) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    s3.put("data/big.bin", payload)
    settings = s3.settings(maxAttempts=1)
    # Every GET of the object is cut off half-way; s3transfer's body retries run out.
    s3.proxy.add_fault("truncate", times=None, method="GET", path_contains="/data/big.bin")
    with pytest.raises((StorageError, SpecError)) as info:
        localize(s3.uri("data/big.bin"), settings, field="data.datasets[0].path")
    assert s3.uri("data/big.bin") in str(info.value)
    assert s3.proxy.injected, "the fault was never injected"
    target_dir = s3.cache / "s3" / s3.bucket / "data"
    assert not (target_dir / "big.bin").exists()
    leftovers = [p.name for p in target_dir.iterdir()] if target_dir.exists() else []
    assert not [name for name in leftovers if PART_MARKER in name or name == "big.bin"], leftovers

    s3.proxy.reset()
    path = localize(s3.uri("data/big.bin"), settings, field="data.datasets[0].path")
    assert path.read_bytes() == payload


def test_corrupt_cache_entry_is_downloaded_again(s3: S3Env) -> None:
    s3.put("d/a.txt", "hello world")
    settings = s3.settings()
    path = localize(s3.uri("d/a.txt"), settings, field="f")
    path.write_text("hello")  # truncated by someone: size no longer matches the record
    assert localize(s3.uri("d/a.txt"), settings, field="f").read_text() == "hello world"
    assert s3.proxy.count("GET", "/d/a.txt", objects_only=True) == 2


@pytest.mark.slow  # > 1 s
def test_streaming_jsonl_and_parquet(s3: S3Env) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"row {i}", "n": i} for i in range(3000)]
    s3.put("ds/part-0.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:1500]))
    s3.put("ds/part-1.jsonl", "".join(json.dumps(r) + "\n" for r in rows[1500:]))
    table = pa.table({"text": [r["text"] for r in rows], "n": [r["n"] for r in rows]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=500)
    s3.put("pq/data.parquet", buffer.getvalue())
    settings = s3.settings()

    assert list_files(s3.uri("ds"), settings) == [s3.uri("ds/part-0.jsonl"), s3.uri("ds/part-1.jsonl")]
    assert list(iter_jsonl(s3.uri("ds"), settings)) == rows
    batches = list(iter_parquet_batches(s3.uri("pq/data.parquet"), settings, batch_size=700))
    assert sum(b.num_rows for b in batches) == 3000
    assert pa.Table.from_batches(batches).column("n").to_pylist() == list(range(3000))
    # Streaming does not populate the cache.
    assert not (s3.cache / "s3" / s3.bucket / "pq").exists()

    with open_stream(s3.uri("pq/data.parquet"), settings) as handle:
        handle.seek(-4, io.SEEK_END)
        assert handle.read() == b"PAR1"


def test_local_paths_unchanged(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n')
    assert localize(str(tmp_path / "x.jsonl"), None, field="f") == tmp_path / "x.jsonl"
    assert list(iter_jsonl(str(tmp_path))) == [{"a": 1}]
    with pytest.raises(SpecError, match="does not exist"):
        localize(str(tmp_path / "nope"), None, field="f")


def test_streamed_s3_dataset_feeds_the_data_pipeline_without_downloading(s3: S3Env) -> None:
    from kubetune.trainer.api.spec import DatasetSpec
    from kubetune.trainer.train.data.loader import load_source

    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(1200)]
    s3.put("big/part-0.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:600]))
    s3.put("big/part-1.jsonl", "".join(json.dumps(r) + "\n" for r in rows[600:]))
    loaded = load_source(DatasetSpec(path=s3.uri("big/")), field="data.datasets[0]", streaming=True, storage=s3.settings())
    assert loaded.columns == ["instruction", "output"]
    assert list(loaded.dataset) == rows
    assert not (s3.cache / "s3").exists()  # read with ranged GETs; nothing was downloaded into the cache
    with pytest.raises(SpecError, match="no JSONL or Parquet rows"):
        s3.put("empty/readme.txt", "nothing here")
        load_source(DatasetSpec(path=s3.uri("empty/")), field="data.datasets[1]", streaming=True, storage=s3.settings())


@pytest.mark.parametrize("key", ["x/../../../../elsewhere/", "x/../../../../elsewhere/adapter_config.json", "./x", "/abs"])
def test_dot_dot_in_a_uri_key_is_refused_and_nothing_lands_outside_the_cache(s3: S3Env, key: str) -> None:
    """The URI's own key used to be joined to the cache unchecked: `s3://b/x/../../../../elsewhere/`
    wrote files next to the cache. Every key is refused before anything is listed or written."""
    s3.put("x/../../../../elsewhere/adapter_config.json", "{}")  # S3 keeps such keys as they are
    outside = s3.cache.parent
    before = _all_files(outside)
    with pytest.raises(SpecError) as info:
        localize(s3.uri(key), s3.settings(), field="adapter x")
    assert "'..' or '.'" in str(info.value) and info.value.field == "adapter x"
    assert _all_files(outside) == before
    assert s3.proxy.count("GET") == 0  # refused before any request


def test_listed_keys_with_dot_dot_are_refused_by_the_same_join(s3: S3Env) -> None:
    s3.put("pre/ok.txt", "ok")
    s3.put("pre/../../../escaped.txt", "no")
    outside = s3.cache.parent
    with pytest.raises(SpecError) as info:
        localize(s3.uri("pre/"), s3.settings(), field="data")
    assert "cannot be stored as a local file" in str(info.value)
    assert not (outside / "escaped.txt").exists() and "escaped.txt" not in _all_files(outside)


def test_safe_join_is_the_one_checked_join(tmp_path: Path) -> None:
    from kubetune.trainer.api.uri import safe_join

    assert safe_join(tmp_path, "a/b", "c.txt") == tmp_path / "a" / "b" / "c.txt"
    assert safe_join(tmp_path, "") == tmp_path
    for bad in ["..", "a/../../b", "./a", "/etc/passwd", "a/./b"]:
        with pytest.raises(SpecError):
            safe_join(tmp_path, bad, location="s3://b/k", field="f")
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(SpecError):  # a link inside the root that leads out of it
        safe_join(tmp_path, "link/etc")
