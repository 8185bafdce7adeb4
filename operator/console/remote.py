"""Curves of cluster jobs: the `metrics.jsonl` a job's trainer keeps beside its `s3://` output.

A FineTuneJob's pods write their run log into the output prefix (with every checkpoint and at the
end: `trainer/artifacts/s3output.py`), so the console draws a cluster job's loss, eval-loss,
learning-rate and tokens/s curves from there, as it draws a local run's from its directory. Only
the file's tail is read (one ranged GET of at most `TAIL_BYTES`), with short timeouts, so a large
log or a slow endpoint cannot stall the page.

The console reads with its own S3 identity (the standard AWS chain: environment, IRSA, instance
role), at the endpoint the job's `spec.training.storage` names; it never reads the job's Secret.
An output on a volume is the pods' own: the page says the curves come from S3 outputs only.
"""

from __future__ import annotations

from typing import Any

from kubetune.operator.console.runs import METRICS, parse_records

TAIL_BYTES = 1024 * 1024
"""At most this much of the end of metrics.jsonl is read (about 5,000 records)."""
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0


def output_uri(obj: dict[str, Any]) -> str | None:
    """The job's `s3://` output prefix, or None (an InferenceService, an output on a volume)."""
    from kubetune.trainer.api.uri import is_s3

    training = (obj.get("spec") or {}).get("training") or {}
    path = (training.get("output") or {}).get("path")
    return path if isinstance(path, str) and is_s3(path) else None


def job_metrics(obj: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """(metrics records, None), or ([], why there are none to draw) for a FineTuneJob or
    AlignmentJob as the API server returns it."""
    uri = output_uri(obj)
    if uri is None:
        return [], "The curves come from an s3:// output (spec.training.output.path); this job's is not one."
    try:
        body, ranged = _read_tail(obj, uri)
    except Exception as exc:  # no credentials, no such object yet, a refused read: say which, keep the page
        return [], _why(exc, uri)
    text = body.decode(errors="replace")
    if ranged and "\n" in text:  # a ranged read starts inside a line: drop the partial one
        text = text.split("\n", 1)[1]
    return parse_records(text), None


def _read_tail(obj: dict[str, Any], uri: str) -> tuple[bytes, bool]:
    """The last TAIL_BYTES of metrics.jsonl under `uri`, and whether the file was longer."""
    from kubetune.trainer.api.spec import StorageSpec
    from kubetune.trainer.api.uri import S3Uri
    from kubetune.trainer.artifacts.client import get_client

    training = (obj.get("spec") or {}).get("training") or {}
    # One attempt: the page polls again anyway, and a dead endpoint must not hold it for retries.
    settings = StorageSpec.model_validate({**(training.get("storage") or {}), "maxAttempts": 1})
    client = get_client(settings, connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S)
    key = S3Uri.parse(uri, "spec.training.output.path").join(METRICS)
    response = client.get_object(Bucket=key.bucket, Key=key.key, Range=f"bytes=-{TAIL_BYTES}")
    total = _total_size(response.get("ContentRange"))
    return response["Body"].read(), total is not None and total > TAIL_BYTES


def _total_size(content_range: str | None) -> int | None:
    """The object's size from a `bytes a-b/total` Content-Range (None when absent or unknown)."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


def _why(exc: BaseException, uri: str) -> str:
    from kubetune.trainer.artifacts.client import is_not_found, redact, translate

    if is_not_found(exc):
        return f"No {METRICS} under {uri} yet: the trainer uploads it with each checkpoint and at the end."
    return redact(str(translate(exc, f"{uri.rstrip('/')}/{METRICS}", field="spec.training.output.path", action="read")))
