"""Read one `DatasetSpec` into raw rows, whatever the source: a local file or directory, an
`s3://` prefix (localized by the storage layer), or a Hugging Face hub dataset.

The loader only reads: it does not interpret columns (that is the aligners' job) except for
LMFlow files, whose rows live under `instances` and whose meaning is given by the file's `type`,
so it records that type for the aligner. Local files are parsed with pyarrow/json straight into
an in-memory Arrow table: no cache directory is written and nothing is fingerprinted, which keeps
small runs and the test suite fast; large corpora should use `data.streaming`, where rows are read
lazily file by file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import DatasetSpec, StorageSpec
from kubetune.trainer.artifacts.output import localize

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}
"""File types read from a local path or a directory (other files in a directory are ignored)."""

LMFLOW_TYPES = ("text_only", "text2text")
_TYPE_RE = re.compile(r'"type"\s*:\s*"([^"]*)"')


@dataclass
class LoadedSource:
    """Raw rows of one source plus what the aligners need to know about where they came from."""

    dataset: datasets.Dataset | datasets.IterableDataset
    columns: list[str]
    """Column names (for a streamed source: the keys of its first row)."""
    first_row: dict[str, Any]
    lmflow_type: str | None = None
    """`text_only`/`text2text` when the rows came from LMFlow files, else None."""
    origin: str = "local"
    """`local` or `hub`."""


def is_local(path: str) -> bool:
    """Whether `path` names a file location (which must exist) rather than a hub dataset id."""
    if path.startswith("s3://") or Path(path).expanduser().exists():
        return True
    return path.startswith(("/", "./", "../", "~", "file:")) or Path(path).suffix.lower() in SUFFIXES


def load_source(
    source: DatasetSpec, *, field: str, streaming: bool = False, storage: StorageSpec | None = None
) -> LoadedSource:
    """Load one dataset source; `field` is its spec location, e.g. `data.datasets[0]`."""
    if streaming and source.path.startswith("s3://"):
        loaded = _stream_s3(source.path, field=field, storage=storage)
    elif is_local(source.path):
        location = source.path[len("file://") :] if source.path.startswith("file://") else source.path
        local = localize(location, storage, field=f"{field}.path")
        loaded = _load_local(local, field=field, streaming=streaming)
    else:
        loaded = _load_hub(source, field=field, streaming=streaming)
    if source.maxSamples is not None:
        if isinstance(loaded.dataset, datasets.Dataset):
            if len(loaded.dataset) > source.maxSamples:
                loaded.dataset = loaded.dataset.select(range(source.maxSamples))
        else:
            loaded.dataset = loaded.dataset.take(source.maxSamples)
    return loaded


# ----------------------------------------------------------------------------------------------
# local files


def list_files(path: Path, *, field: str) -> list[Path]:
    """The data files at `path`: the file itself, or every supported file under a directory."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise SpecError(
                f"{field}.path",
                f"{str(path)!r} has an unsupported file type {path.suffix!r}.",
                f"use one of {', '.join(SUFFIXES)} (or a directory of them).",
            )
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise SpecError(
            f"{field}.path",
            f"directory {str(path)!r} contains no {'/'.join(SUFFIXES)} files.",
            "point at a data file or a directory holding some.",
        )
    return files


def sniff_json(path: Path) -> tuple[str, str | None]:
    """Classify a `.json` file: ("lmflow", type), ("array", None) or ("lines", None).

    Only the head of the file is read for the common cases, so a streamed run does not parse a
    large file just to learn what it is.
    """
    with path.open("rb") as handle:
        head = handle.read(65536).decode("utf-8", errors="ignore")
    stripped = head.lstrip("\ufeff \t\r\n")
    if stripped.startswith("["):
        return "array", None
    if not stripped.startswith("{"):
        return "lines", None
    match = _TYPE_RE.search(head)
    if match and '"instances"' in head:
        return "lmflow", match.group(1)
    try:  # `type` after a large `instances` list, or JSON lines in a .json file
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError:
        return "lines", None
    if isinstance(document, dict) and "instances" in document:
        return "lmflow", str(document.get("type"))
    return "lines", None


def _read_json_lines(path: Path, field: str) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise SpecError(
                    f"{field}.path",
                    f"{str(path)!r} line {number} is not valid JSON ({exc}).",
                    "fix the file.",
                ) from exc
            if not isinstance(row, dict):
                raise SpecError(
                    f"{field}.path",
                    f"{str(path)!r} line {number} is not a JSON object.",
                    "write one object per line.",
                )
            yield row


def _read_json_document(path: Path, field: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        raise SpecError(
            f"{field}.path", f"{str(path)!r} is not valid JSON ({exc}).", "fix the file."
        ) from exc


def iter_file_rows(path: Path, field: str) -> tuple[Iterator[dict[str, Any]], str | None]:
    """Rows of one file as dicts, and its LMFlow type (None for other files)."""
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "jsonl":
        return _read_json_lines(path, field), None
    if kind == "json":
        shape, _ = sniff_json(path)
        if shape == "lines":
            return _read_json_lines(path, field), None
        document = _read_json_document(path, field)
        if shape == "lmflow":
            instances = document.get("instances") if isinstance(document, dict) else None
            if not isinstance(instances, list):
                raise SpecError(
                    f"{field}.path", f"{str(path)!r}: LMFlow `instances` must be a list.", "fix the file."
                )
            return iter(instances), str(document.get("type"))
        if not isinstance(document, list):
            raise SpecError(
                f"{field}.path",
                f"{str(path)!r} holds a JSON {type(document).__name__}, not a list of rows.",
                'write a list of objects, JSON lines, or an LMFlow {"type": ..., "instances": [...]} file.',
            )
        return iter(document), None
    table = _read_table(path, kind, field)
    return iter(table.to_pylist()), None


def _read_table(path: Path, kind: str, field: str) -> pa.Table:
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SpecError(
            f"{field}.path", f"cannot read {str(path)!r} as {kind} ({exc}).", "fix the file."
        ) from exc


def _rows_to_table(rows: Iterator[dict[str, Any]], path: Path, field: str) -> pa.Table:
    """Rows -> Arrow table over the union of all rows' keys (a missing key becomes null)."""
    columns: dict[str, list[Any]] = {}
    for count, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SpecError(
                f"{field}.path", f"{str(path)!r} row {count} is not a JSON object.", "fix the file."
            )
        for key in [k for k in row if k not in columns]:
            columns[key] = [None] * count
        for key, values in columns.items():
            values.append(row.get(key))
    try:
        return (
            pa.table({key: pa.array(values) for key, values in columns.items()}) if columns else pa.table({})
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SpecError(
            f"{field}.path",
            f"{str(path)!r} has a column whose values mix types ({exc}).",
            "give each column one type in every row.",
        ) from exc


def _lmflow_type(types: set[str | None], field: str) -> str | None:
    if not types or types == {None}:
        return None
    if None in types or len(types) > 1:
        raise SpecError(
            f"{field}.path",
            f"the files mix LMFlow types and other data ({sorted(str(t) for t in types)}).",
            "keep one LMFlow type per dataset entry; list the others as separate datasets.",
        )
    (kind,) = types
    if kind not in LMFLOW_TYPES:
        raise SpecError(
            f"{field}.path", f"unsupported LMFlow type {kind!r}.", f"use one of {', '.join(LMFLOW_TYPES)}."
        )
    return kind


def _s3_rows(location: str, field: str, storage: StorageSpec | None) -> Iterator[dict[str, Any]]:
    """Rows of every JSONL/Parquet object under `location`, read with ranged GETs (no download)."""
    from kubetune.trainer.artifacts.stream import iter_jsonl, iter_parquet_batches
    from kubetune.trainer.artifacts.stream import list_files as list_objects

    for uri in list_objects(location, storage, field=f"{field}.path", suffixes=(".jsonl", ".parquet")):
        if uri.endswith(".parquet"):
            for batch in iter_parquet_batches(uri, storage, field=f"{field}.path"):
                yield from batch.to_pylist()
        else:
            yield from iter_jsonl(uri, storage, field=f"{field}.path")


def _stream_s3(location: str, *, field: str, storage: StorageSpec | None) -> LoadedSource:
    """`data.streaming` on an `s3://` JSONL/Parquet source: rows stream from S3, nothing is cached."""
    first = next(_s3_rows(location, field, storage), None)
    if first is None:
        raise SpecError(f"{field}.path", f"{location!r} holds no JSONL or Parquet rows to stream.",
                        "point it at .jsonl/.parquet objects (other formats: turn streaming off to download them).")
    dataset = datasets.IterableDataset.from_generator(
        _s3_rows, gen_kwargs={"location": location, "field": field, "storage": storage}
    )
    return LoadedSource(dataset, list(first), first, None)


def _load_local(path: Path, *, field: str, streaming: bool) -> LoadedSource:
    files = list_files(path, field=field)
    if streaming:
        types = {sniff_json(f)[1] if f.suffix.lower() == ".json" else None for f in files}
        lmflow_type = _lmflow_type(types, field)
        first = None
        for file in files:
            rows, _ = iter_file_rows(file, field)
            first = next(rows, None)
            if first is not None:
                break
        if first is None:
            raise _empty(field, path)
        dataset = datasets.IterableDataset.from_generator(
            _generate_rows, gen_kwargs={"files": [str(f) for f in files], "field": field}
        )
        return LoadedSource(dataset, list(first), first, lmflow_type)

    tables, types = [], set()
    for file in files:
        kind = SUFFIXES[file.suffix.lower()]
        if kind in ("json", "jsonl"):
            rows, lmflow_type = iter_file_rows(file, field)
            types.add(lmflow_type)
            table = _rows_to_table(rows, file, field)
        else:
            types.add(None)
            table = _read_table(file, kind, field)
        if table.num_rows:
            tables.append(table)
    lmflow_type = _lmflow_type(types, field)
    if not tables:
        raise _empty(field, path)
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SpecError(
            f"{field}.path",
            f"the files under {str(path)!r} have incompatible columns ({exc}).",
            "give every file the same columns and types, or list them as separate datasets.",
        ) from exc
    dataset = datasets.Dataset(table)
    return LoadedSource(dataset, list(dataset.column_names), dataset[0], lmflow_type)


def _generate_rows(files: list[str], field: str) -> Iterator[dict[str, Any]]:
    """Streaming generator (top level so datasets can pickle it and shard it by `files`)."""
    for name in files:
        rows, _ = iter_file_rows(Path(name), field)
        yield from rows


def _empty(field: str, path: Any) -> SpecError:
    return SpecError(
        f"{field}.path", f"{str(path)!r} contains no examples.", "point at a file with data in it."
    )


# ----------------------------------------------------------------------------------------------
# hub datasets


def _load_hub(source: DatasetSpec, *, field: str, streaming: bool) -> LoadedSource:
    try:
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split, streaming=streaming)
    except Exception as exc:  # offline, unknown id, unknown split/subset, auth: all user-fixable
        raise SpecError(
            f"{field}.path",
            f"could not load {source.path!r} (subset {source.subset!r}, split {source.split!r}) from the "
            f"Hugging Face hub: {type(exc).__name__}: {exc}",
            "check the dataset id, `subset` and `split`, that this machine can reach the hub "
            "(HF_HUB_OFFLINE, HF_TOKEN), or use a local path or s3:// URI.",
        ) from exc
    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise _empty(field, source.path)
        return LoadedSource(dataset, list(dataset.column_names), dataset[0], origin="hub")
    first = next(iter(dataset), None)
    if first is None:
        raise _empty(field, source.path)
    return LoadedSource(dataset, list(first), first, origin="hub")
