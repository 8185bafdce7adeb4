"""The boto3 S3 client built from a `StorageSpec`, and S3 errors turned into user messages.

Credentials come only from the standard AWS chain (environment, shared config/credentials files,
web identity / IRSA, container and instance roles); the spec carries none. Endpoint precedence:
`storage.endpointUrl`, then `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`, then AWS itself.

Errors: a permanent S3 error (no such bucket/key, access denied, bad credentials) becomes a
`SpecError` (exit code 2: the operator fails the job instead of retrying a wrong setting);
transient errors are retried by botocore (adaptive mode) and, when retries run out, become a
`StorageError` (exit code 1: a later pod restart may succeed). No message ever contains a
credential value: every text we build passes through `redact`, and botocore's own debug logs
get a redacting filter.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from kubetune.trainer.api.errors import KubetuneError, SpecError
from kubetune.trainer.api.spec import StorageSpec

log = logging.getLogger("kubetune.storage")

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
"""Default socket timeouts per request (botocore's `connect_timeout` / `read_timeout`). Callers that
must give up quickly (the operator's best-effort status read) pass shorter ones to `get_client`."""

MULTIPART_CHUNK_BYTES = 16 * 1024 * 1024
"""Part size for multipart transfers. Bigger than boto3's 8 MiB default: fewer requests for
multi-GB checkpoints; s3transfer still raises it when a file would need more than 10,000 parts."""

PERMANENT_CODES = {
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "the object does not exist",
    "404": "not found",
    "NotFound": "not found",
    "AccessDenied": "access denied",
    "403": "access denied",
    "Forbidden": "access denied",
    "AllAccessDisabled": "access to the bucket is disabled",
    "AccountProblem": "the account cannot use S3",
    "InvalidAccessKeyId": "the access key id is not known to the endpoint",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "TokenRefreshRequired": "the session token has expired",
    "InvalidBucketName": "the bucket name is invalid",
    "PermanentRedirect": "the bucket is in another region",
    "301": "the bucket is in another region",
    "AuthorizationHeaderMalformed": "the request was signed for the wrong region",
    "InvalidRequest": "the request was refused",
}

_FIXES = {
    "the bucket does not exist": "check the bucket name (and storage.endpointUrl for S3-compatible stores).",
    "the object does not exist": "check the key; list it with `kubetune storage ls`.",
    "not found": "check the bucket and key; list them with `kubetune storage ls`.",
    "access denied": "grant the job's role (IRSA/instance role) or credentials s3:GetObject, "
    "s3:PutObject, s3:ListBucket and s3:DeleteObject on this location.",
    "the bucket is in another region": "set storage.region (or AWS_REGION) to the bucket's region.",
    "the request was signed for the wrong region": "set storage.region (or AWS_REGION) to the bucket's region.",
}


class StorageError(KubetuneError):
    """A transfer that still failed after retries (network, 5xx, verification): exit code 1."""


# ---------------------------------------------------------------------------------------------
# Redaction


def _secret_values() -> list[str]:
    """Credential values that must never be printed: from the environment and the resolved chain."""
    values = [
        os.environ.get(name, "")
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
    ]
    with _lock:
        for creds in _resolved_credentials:
            values += [creds.access_key or "", creds.secret_key or "", creds.token or ""]
    return sorted({v for v in values if len(v) >= 8}, key=len, reverse=True)


def redact(text: str) -> str:
    """Replace every known credential value in `text` with `***`."""
    for value in _secret_values():
        text = text.replace(value, "***")
    return text


class RedactingFilter(logging.Filter):
    """Scrubs credential values from botocore/urllib3 debug records (they log signed headers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_REDACTED_LOGGERS = (
    "botocore", "botocore.endpoint", "botocore.auth", "botocore.hooks", "botocore.parsers",
    "botocore.httpsession", "botocore.retryhandler", "botocore.credentials", "botocore.utils",
    "botocore.regions", "botocore.client", "botocore.retries.standard", "botocore.retries.adaptive",
    "boto3", "boto3.resources.action", "s3transfer", "s3transfer.tasks", "s3transfer.futures",
    "s3transfer.utils", "urllib3", "urllib3.connectionpool", "kubetune.storage",
)
_filter_installed = False


def _install_log_filter() -> None:
    global _filter_installed
    if _filter_installed:
        return
    redacting = RedactingFilter()
    for name in _REDACTED_LOGGERS:
        logging.getLogger(name).addFilter(redacting)
    _filter_installed = True


# ---------------------------------------------------------------------------------------------
# Client


_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}
_resolved_credentials: list[Any] = []


def endpoint_url(settings: StorageSpec) -> str | None:
    """The S3 endpoint in effect (None: AWS's regional endpoint)."""
    url = settings.endpointUrl or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url and not url.startswith(("http://", "https://")):
        field = "storage.endpointUrl" if settings.endpointUrl else "AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL"
        raise SpecError(field, f"{url!r} is not an http(s) URL.", "write it as https://host[:port].")
    return url or None


def get_client(
    settings: StorageSpec | None = None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
) -> Any:
    """A thread-safe S3 client for these settings and timeouts (one per settings, timeouts,
    endpoint and process). `connect_timeout`/`read_timeout` bound each request's socket waits
    (seconds); the defaults suit transfers, a best-effort read passes shorter ones."""
    settings = settings or StorageSpec()
    url = endpoint_url(settings)
    cache_key = (
        settings.model_dump_json(), url, os.getpid(), os.environ.get("AWS_PROFILE"),
        float(connect_timeout), float(read_timeout),
    )
    with _lock:
        client = _clients.get(cache_key)
    if client is not None:
        return client
    session = boto3.session.Session(region_name=settings.region)
    config = Config(
        # botocore's `max_attempts` counts retries; `total_max_attempts` counts the first try too,
        # which is what `maxAttempts` promises ("attempts per request").
        retries={"mode": "adaptive", "total_max_attempts": settings.maxAttempts},
        s3={"addressing_style": "path" if settings.pathStyle else "auto"},
        max_pool_connections=max(10, 2 * settings.maxConcurrency + 4),
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    client = session.client("s3", endpoint_url=url, config=config)
    creds = session.get_credentials()
    with _lock:
        if creds is not None:
            _resolved_credentials.append(creds.get_frozen_credentials())
        _clients[cache_key] = client
    return client


def transfer_config(settings: StorageSpec | None = None) -> TransferConfig:
    """Multipart and concurrency settings for s3transfer (uploads and downloads alike)."""
    settings = settings or StorageSpec()
    threshold = settings.multipartThresholdMb * 1024 * 1024
    return TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=MULTIPART_CHUNK_BYTES,
        max_concurrency=settings.maxConcurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )


# ---------------------------------------------------------------------------------------------
# Errors


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or str(
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
    return ""


def is_permanent(exc: BaseException) -> bool:
    """Errors no retry can fix: missing bucket/key, access or credential problems."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | SpecError):
        return True
    return error_code(exc) in PERMANENT_CODES


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) in ("NoSuchKey", "404", "NotFound")


def translate(exc: BaseException, uri: str, *, field: str = "", action: str = "access") -> KubetuneError:
    """A boto3/botocore exception as a one-paragraph user error naming `uri` (never a secret)."""
    if isinstance(exc, KubetuneError):
        return exc
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return SpecError(
            field,
            f"cannot {action} {uri}: no AWS credentials were found.",
            "provide them the standard AWS way: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a shared "
            "credentials file/AWS_PROFILE, IRSA (web identity) or an instance role.",
        )
    code = error_code(exc)
    if code in PERMANENT_CODES:
        problem = PERMANENT_CODES[code]
        fix = _FIXES.get(problem, "check the location and the credentials' permissions.")
        return SpecError(field, redact(f"cannot {action} {uri}: {problem} ({code})."), fix)
    if isinstance(exc, BotoConnectionError):
        return StorageError(
            redact(f"cannot {action} {uri}: the S3 endpoint could not be reached after retries ({exc}).")
        )
    if isinstance(exc, ClientError | BotoCoreError):
        return StorageError(redact(f"cannot {action} {uri}: {exc} (still failing after retries)."))
    return StorageError(redact(f"cannot {action} {uri}: {type(exc).__name__}: {exc}"))


_install_log_filter()  # at import: covers every boto3 client in the process, not only ours
