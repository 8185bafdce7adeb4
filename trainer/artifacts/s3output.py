"""The output session for an `s3://` output prefix: background checkpoint uploads, resume from S3,
retention in S3, status.json, and a `finalize()` that only returns once everything is stored.

The trainer writes into `local_dir` (a staging directory in the cache, keyed by the URI). Object
layout under the output prefix mirrors it:
    <prefix>/checkpoint-<step>/...                  checkpoint files
    <prefix>/checkpoint-<step>/kubetune-manifest.json  uploaded LAST: marks the checkpoint complete
    <prefix>/status.json, metrics.jsonl, loss.png, adapter/model files, ...

Crash safety: a checkpoint's manifest object is deleted before (re)uploading its files and put
only after every file uploaded and verified, and retention deletes the manifest before the files;
so at every instant an S3 checkpoint with a manifest is whole. `latest_checkpoint()` trusts only
those (and re-checks sizes against the listing and SHA-256s after download).

`checkpoint_saved` snapshots the checkpoint with hard links before returning, so that the hashing
and uploading can happen on a background thread whatever later happens to the local directory.

Rotation (`checkpoint.keepLast`) only ever deletes a checkpoint once a newer one is complete: in S3
(`_apply_retention`) after the new manifest is stored; on rank 0's disk (`rotate_checkpoints`,
not transformers' `save_total_limit`, which deleted the old checkpoint before the new one was
complete) after the new one's upload has finished.

Multi-node checkpoints: with ZeRO (and for per-rank RNG states) every rank writes its own files
of a checkpoint, each onto its own node's disk. One process per node uploads its node's share:
    <prefix>/checkpoint-<step>/kubetune-shards-<rank>.json   "my files are uploaded": their
        sizes and SHA-256s, and the token of this save (agreed by all ranks when it was saved)
The global rank 0 uploads its own files, waits for every expected shards marker carrying this
save's token (so one left over from an earlier attempt at the same step never counts), merges the
listed files into the manifest and uploads it last: the checkpoint is complete only when every
node's files are in S3. A node that fails to upload writes its marker with the error (rank 0 stops
waiting at once); one that never reports leaves the checkpoint incomplete after `shards_timeout`.
Every node downloads the whole checkpoint on resume, as every rank loads all of it.

Local rotation on the other nodes: rank 0's session rotates only its own disk, so each other
node's uploader rotates its own disk after handing over a checkpoint (`_rotate_node_checkpoints`):
it deletes its local `checkpoint-*` directories beyond the newest `keep_last`, but only those whose
files this session uploaded (marker written), that are no longer being uploaded, and that are older
than the newest checkpoint complete in S3 (which is kept).

Run logs (`metrics.jsonl`, `samples.jsonl`) are appended to by every attempt of a job, so that the
curve covers the whole job. Each checkpoint carries a copy of them as of its save
(`output.snapshot_run_logs`), covered by its manifest: a resume continues from that copy, so no
record before the resumed step is lost and none after it is kept twice. The copy is also uploaded
to the prefix before the manifest (so the prefix's logs are never older than the newest complete
checkpoint), and a session that finds no local logs restores them from the prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import KubetuneError, SpecError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.api.uri import S3Uri
from kubetune.trainer.artifacts.cache import cache_root
from kubetune.trainer.artifacts.client import StorageError, get_client, is_not_found, redact, translate
from kubetune.trainer.artifacts.output import (
    CHECKPOINT_RE,
    LOGS_DIR,
    MANIFEST_NAME,
    RUN_LOGS,
    STATUS_NAME,
    OutputSession,
    checkpoint_files,
    list_checkpoints,
    read_manifest,
    save_manifest,
    snapshot_run_logs,
)
from kubetune.trainer.artifacts.transfer import (
    PART_MARKER,
    Digests,
    ObjectInfo,
    Transfers,
    file_digests,
    list_objects,
)

log = logging.getLogger("kubetune.storage")

WORK_PREFIX = ".kubetune-"
"""Names in `local_dir` starting with this are the session's own scratch space, never uploaded."""
STATUS_INTERVAL_S = 15.0
SUCCEEDED = "Succeeded"
SHARDS_PREFIX = "kubetune-shards-"
SHARDS_TIMEOUT_S = 1800.0
"""How long rank 0 waits for another node's files of a checkpoint (after its own are uploaded)."""
SHARDS_CLOSE_GRACE_S = 60.0
"""Once the session is closing (the run failed), wait at most this much longer for them."""
SHARDS_POLL_S = 0.5


def shards_marker_name(rank: int) -> str:
    """The object another node writes into a checkpoint once its files of it are uploaded."""
    return f"{SHARDS_PREFIX}{rank}.json"


def _hardlink_tree(source: Path, target: Path, files: Sequence[str] | None = None) -> None:
    """Snapshot a directory (or the `files` of it) cheaply: hard links, copies where links are
    not possible."""
    chosen = checkpoint_files(source) if files is None else [source / rel for rel in files]
    for file in chosen:
        dest = target / file.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, dest)
        except OSError:
            shutil.copy2(file, dest)


class S3OutputSession(OutputSession):
    """See the module docstring. Thread-safe for the calls a training loop makes."""

    def __init__(
        self,
        location: str,
        settings: StorageSpec | None = None,
        *,
        keep_last: int | None = None,
        status_interval: float = STATUS_INTERVAL_S,
        shards_timeout: float = SHARDS_TIMEOUT_S,
    ):
        settings = settings or StorageSpec()
        parsed = S3Uri.parse(location, "output.path")
        self.uri = S3Uri(parsed.bucket, parsed.prefix)
        digest = hashlib.sha256(str(self.uri).encode()).hexdigest()[:12]
        local = cache_root(settings) / "outputs" / f"{parsed.name}-{digest}"
        super().__init__(location, settings, keep_last=keep_last, local_dir=local)
        self.client = get_client(settings)
        self.status_interval = status_interval
        self.shards_timeout = shards_timeout
        self._probe()
        if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes the logs
            self._restore_run_logs()
        self._transfers = Transfers(settings, self.client)
        self._checkpoint_pool = ThreadPoolExecutor(1, thread_name_prefix="kubetune-ckpt-upload")
        self._status_pool = ThreadPoolExecutor(1, thread_name_prefix="kubetune-status")
        self._lock = threading.Lock()
        self._pending: list[Future[None]] = []
        self._errors: list[KubetuneError] = []
        self._in_flight: set[str] = set()
        self._rejected: set[str] = set()
        self._last_uri: str | None = None
        self._status: dict[str, Any] | None = None
        self._status_queued = False
        self._status_uploaded_at = 0.0
        self._closed = False
        self._closing_since: float | None = None
        self._shard_errors: list[KubetuneError] = []
        self._shards_uploaded: set[str] = set()
        """Checkpoints whose files this node handed over (marker written) in this session."""
        self._stored: set[str] = set()
        """Checkpoints this session completed in S3 (manifest stored), whether or not this disk
        holds all their files (under ZeRO on several nodes it does not, and gets no local manifest)."""

    # -- helpers ------------------------------------------------------------------------------

    def _probe(self) -> None:
        """Fail fast (before any training) when the bucket is missing or not ours to use."""
        try:
            list_objects(self.client, self.uri.bucket, self.uri.prefix, max_keys=1)
        except Exception as exc:
            raise translate(exc, str(self.uri), field="output.path", action="write to") from None

    def _restore_run_logs(self) -> None:
        """Bring back the run logs of earlier attempts when this disk has none (a new pod)."""
        for name in RUN_LOGS:
            local = self.local_dir / name
            if local.exists():
                continue
            uri = self._key(name)
            try:
                body = self.client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
            except Exception as exc:
                if is_not_found(exc):
                    continue
                raise translate(exc, str(uri), field="output.path", action="read") from None
            tmp = local.with_name(name + ".tmp")
            tmp.write_bytes(body)
            os.replace(tmp, local)
            log.info("restored %s from %s (earlier attempts of this run)", name, uri)

    def _key(self, *parts: str) -> S3Uri:
        return self.uri.join(*parts)

    def _fail(self, exc: BaseException, uri: str, action: str) -> KubetuneError:
        error = translate(exc, uri, field="output.path", action=action)
        log.error("%s", error)
        with self._lock:
            self._errors.append(error)
        return error

    def _raise_permanent(self) -> None:
        """Surface a permanent background failure at the next call (training stops early)."""
        with self._lock:
            permanent = [e for e in self._errors if isinstance(e, SpecError)]
        if permanent:
            raise permanent[0]

    @property
    def last_checkpoint_uri(self) -> str | None:
        return self._last_uri

    def _remote_checkpoints(self) -> dict[str, dict[str, Any]]:
        """{name: {"step", "manifest": bool, "objects": {relative key: ObjectInfo}}} under the prefix."""
        found: dict[str, dict[str, Any]] = {}
        for info in list_objects(self.client, self.uri.bucket, self.uri.prefix):
            name, _, rest = self.uri.relative(info.key).partition("/")
            match = CHECKPOINT_RE.match(name)
            if not match or not rest:
                continue
            entry = found.setdefault(name, {"step": int(match.group(1)), "manifest": False, "objects": {}})
            if rest == MANIFEST_NAME:
                entry["manifest"] = True
            else:
                entry["objects"][rest] = info
        return found

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            response = self.client.delete_objects(Bucket=self.uri.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StorageError(f"cannot delete s3://{self.uri.bucket}/{first.get('Key')}: {first.get('Code')}.")

    def _delete_checkpoint(self, name: str, entry: dict[str, Any]) -> None:
        """Manifest first: a half-deleted checkpoint must already look incomplete."""
        self.client.delete_object(Bucket=self.uri.bucket, Key=self._key(name, MANIFEST_NAME).key)
        self._delete_keys([info.key for info in entry["objects"].values()])

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_saved(self, path: Path, step: int, *, shards_from: Sequence[int] = (), token: str | None = None) -> None:
        """Copy the run logs into the checkpoint, snapshot it (hard links) and upload it in the
        background; returns at once. With `shards_from`, the manifest also waits for (and lists)
        those ranks' files."""
        self._raise_permanent()
        path = Path(path)
        snapshot_run_logs(self.local_dir, path)  # copies, not links: the originals keep growing
        self._queue_upload(path, step, shards_from, token)

    def _queue_upload(self, path: Path, step: int, shards_from: Sequence[int] = (), token: str | None = None) -> None:
        name = path.name if CHECKPOINT_RE.match(path.name) else f"checkpoint-{step}"
        snapshot = self.local_dir / f"{WORK_PREFIX}upload" / f"{name}-{uuid.uuid4().hex[:8]}"
        _hardlink_tree(path, snapshot)
        with self._lock:
            self._in_flight.add(name)
            future = self._checkpoint_pool.submit(
                self._upload_checkpoint, path, snapshot, name, step, tuple(shards_from), token
            )
            self._pending.append(future)

    def checkpoint_shards_saved(self, path: Path, step: int, files: Sequence[str], *, rank: int, token: str) -> None:
        """Snapshot this node's `files` of the checkpoint and upload them in the background, then
        their shards marker (rank 0 writes the manifest once it has every node's marker)."""
        self._raise_permanent()
        path = Path(path)
        name = path.name if CHECKPOINT_RE.match(path.name) else f"checkpoint-{step}"
        snapshot = self.local_dir / f"{WORK_PREFIX}upload" / f"{name}-rank{rank}-{uuid.uuid4().hex[:8]}"
        _hardlink_tree(path, snapshot, files)
        with self._lock:
            self._in_flight.add(name)
            future = self._checkpoint_pool.submit(self._upload_shards, snapshot, name, step, rank, token)
            self._pending.append(future)

    def _upload_shards(self, snapshot: Path, name: str, step: int, rank: int, token: str) -> None:
        target = str(self._key(name))
        marker = self._key(name, shards_marker_name(rank))
        try:
            digests = {
                file.relative_to(snapshot).as_posix(): file_digests(file, self.settings)
                for file in checkpoint_files(snapshot)
            }
            # This step is being saved again (after a resume): no old manifest may vouch for it.
            manifest_uri = self._key(name, MANIFEST_NAME)
            self.client.delete_object(Bucket=manifest_uri.bucket, Key=manifest_uri.key)
            self._upload_verified(snapshot, name, digests)
            files = {rel: {"size": d.size, "sha256": d.sha256} for rel, d in digests.items()}
            body = {"step": step, "rank": rank, "token": token, "files": files}
            self.client.put_object(Bucket=marker.bucket, Key=marker.key, Body=json.dumps(body, indent=1).encode())
            log.info("rank %d: %d files of checkpoint %s uploaded", rank, len(files), target)
            with self._lock:
                self._shards_uploaded.add(name)
        except Exception as exc:
            error = self._fail(exc, target, "upload checkpoint files to")
            with self._lock:
                self._shard_errors.append(error)
            body = {"step": step, "rank": rank, "token": token, "error": str(error)[:500]}
            with contextlib.suppress(Exception):  # tell rank 0 at once, rather than let it wait
                self.client.put_object(Bucket=marker.bucket, Key=marker.key, Body=json.dumps(body).encode())
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
            with self._lock:
                self._in_flight.discard(name)
        self._rotate_node_checkpoints()

    def _rotate_node_checkpoints(self) -> list[Path]:
        """On a node other than rank 0's: delete this disk's checkpoint directories beyond the
        newest `keep_last` (see the module docstring for what is never deleted). Best effort: a
        failure is logged, never raised (the disk only keeps a copy of what S3 holds)."""
        if not self.keep_last:
            return []
        try:
            remote = self._remote_checkpoints()
        except Exception as exc:
            log.warning("local rotation skipped: %s", translate(exc, str(self.uri), action="list checkpoints in"))
            return []
        complete = [e["step"] for e in remote.values() if e["manifest"]]
        if not complete:
            return []
        newest_complete = max(complete)
        local = list_checkpoints(self.local_dir)
        with self._lock:
            uploaded, in_flight = set(self._shards_uploaded), set(self._in_flight)
        removed: list[Path] = []
        for step, path in local[: -self.keep_last]:
            name = path.name
            if name not in uploaded or name in in_flight or step >= newest_complete:
                continue
            log.info("local rotation: deleting %s (uploaded; keeping the newest %d)", path, self.keep_last)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            with self._lock:
                self._shards_uploaded.discard(name)
        return removed

    def wait_shards(self) -> None:
        """Block until this node's checkpoint files are uploaded; raise the first failure."""
        self.wait()
        with self._lock:
            errors = list(self._shard_errors)
        if errors:
            raise errors[0]

    def _upload_verified(self, snapshot: Path, name: str, digests: dict[str, Digests]) -> None:
        """Upload `digests`' files from `snapshot` into checkpoint `name` in parallel; verify each."""
        futures = [
            (self._transfers.start_upload(snapshot / rel, self._key(name, rel), d), rel, d)
            for rel, d in digests.items()
        ]
        for future, _, _ in futures:
            future.result()
        for _, rel, d in futures:
            self._transfers.verify_upload(self._key(name, rel), d)

    def _await_shards(self, name: str, ranks: Sequence[int], token: str | None) -> dict[str, Any]:
        """The files other nodes uploaded for this save of checkpoint `name`, once each of `ranks`
        has written its shards marker with `token` (checked against the listing: all present)."""
        merged: dict[str, Any] = {}
        pending = set(ranks)
        started = time.monotonic()
        while pending:
            for rank in sorted(pending):
                marker = self._read_json(self._key(name, shards_marker_name(rank)))
                if marker is None or marker.get("token") != token:
                    continue  # not written yet, or left over from an earlier save of this step
                if marker.get("error"):
                    raise StorageError(f"rank {rank} could not upload its files of {self._key(name)}: {marker['error']}")
                merged.update(marker.get("files") or {})
                pending.discard(rank)
            if pending and self._shards_overdue(started):
                raise StorageError(
                    f"rank(s) {sorted(pending)} did not upload their files of {self._key(name)} in time; "
                    "the checkpoint stays incomplete."
                )
            if pending:
                time.sleep(SHARDS_POLL_S)
        if merged:
            objects = {self.uri.relative(o.key): o for o in list_objects(self.client, self.uri.bucket, self._key(name).key + "/")}
            for rel, meta in merged.items():
                info = objects.get(f"{name}/{rel}")
                if info is None or info.size != meta.get("size"):
                    raise StorageError(f"{self._key(name, rel)} is missing or has the wrong size.")
        return merged

    def _shards_overdue(self, started: float) -> bool:
        now = time.monotonic()
        if now - started > self.shards_timeout:
            return True
        with self._lock:
            closing = self._closing_since
        return closing is not None and now - closing > SHARDS_CLOSE_GRACE_S

    def _upload_run_logs(self, logs: Path) -> None:
        """The run logs as of a checkpoint, to the prefix, before its manifest: the prefix's copy
        is then never older than the newest complete checkpoint's (a resume uses the
        checkpoint's own copy, uploaded with its files)."""
        for name in RUN_LOGS:
            file = logs / name
            if not file.is_file():
                continue
            uri = self._key(name)
            try:
                self._transfers.upload_file(file, uri)
            except Exception as exc:  # not fatal: the checkpoint holds its copy, finalize() uploads them again
                log.warning("%s", translate(exc, str(uri), field="output.path", action="upload"))

    def _upload_checkpoint(
        self,
        original: Path,
        snapshot: Path,
        name: str,
        step: int,
        shards_from: Sequence[int] = (),
        token: str | None = None,
    ) -> None:
        target = str(self._key(name))
        try:
            files: dict[str, Any] = {}
            digests: dict[str, Digests] = {}
            for file in checkpoint_files(snapshot):
                relative = file.relative_to(snapshot).as_posix()
                digests[relative] = file_digests(file, self.settings)
                files[relative] = {"size": digests[relative].size, "sha256": digests[relative].sha256}
            manifest = {"step": step, "files": files, "createdAt": time.time()}
            manifest_uri = self._key(name, MANIFEST_NAME)
            # Re-uploading a step (after a resume) must not leave an old manifest vouching for new files.
            self.client.delete_object(Bucket=manifest_uri.bucket, Key=manifest_uri.key)
            self._upload_verified(snapshot, name, digests)
            if shards_from:
                files.update(self._await_shards(name, shards_from, token))
            self._upload_run_logs(snapshot / LOGS_DIR)
            body = json.dumps(manifest, indent=1).encode()
            self.client.put_object(Bucket=manifest_uri.bucket, Key=manifest_uri.key, Body=body)
            # Locally complete only if this disk holds every file (not so when other nodes wrote some).
            if original.is_dir() and all((original / rel).is_file() for rel in files):
                with contextlib.suppress(OSError):
                    save_manifest(original, manifest)
            with self._lock:
                self._last_uri = target
                self._stored.add(name)
            log.info("checkpoint %s uploaded (%d files)", target, len(files))
            self._apply_retention()
        except Exception as exc:
            self._fail(exc, target, "upload checkpoint to")
            return
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
            with self._lock:
                self._in_flight.discard(name)
                busy = set(self._in_flight)
        self.rotate_checkpoints(busy=busy)

    def _counts_as_complete(self, checkpoint: Path) -> bool:
        """Complete in S3: stored by this session, or complete here (downloaded, or uploaded by an
        earlier attempt, whose local manifest is written only once S3 has it)."""
        with self._lock:
            stored = checkpoint.name in self._stored
        return stored or super()._counts_as_complete(checkpoint)

    def _apply_retention(self) -> None:
        """Keep the newest `keep_last` complete checkpoints in S3 (independent of local rotation)."""
        if not self.keep_last:
            return
        remote = self._remote_checkpoints()
        complete = sorted((e["step"], n) for n, e in remote.items() if e["manifest"])
        for _step, name in complete[: -self.keep_last]:
            log.info("retention: deleting %s", self._key(name))
            self._delete_checkpoint(name, remote[name])

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, local or in S3 (downloaded into `local_dir`), else None.

        A local checkpoint that is complete but missing in S3 (killed mid-upload) is queued for
        upload, so S3 catches up with what the run resumes from."""
        local = super().latest_checkpoint()
        local_step = int(CHECKPOINT_RE.match(local.name).group(1)) if local else -1  # type: ignore[union-attr]
        try:
            remote = self._remote_checkpoints()
        except Exception as exc:
            raise translate(exc, str(self.uri), field="output.path", action="list checkpoints in") from None
        candidates = sorted(((e["step"], n) for n, e in remote.items() if e["manifest"]), reverse=True)
        for step, name in candidates:
            if step <= local_step:
                break
            try:
                path = self._download_checkpoint(name, remote[name])
            except StorageError as exc:
                log.warning("skipping checkpoint %s: %s", self._key(name), exc)
                self._rejected.add(name)
                continue
            self._last_uri = str(self._key(name))
            return path
        if local is not None:
            if local.name in remote and remote[local.name]["manifest"]:
                self._last_uri = str(self._key(local.name))
            elif int(os.environ.get("RANK", "0")) == 0:  # one uploader, even if every node has a copy
                self._queue_upload(local, local_step)  # as saved: its logs copy is already in it
        return local

    def _download_checkpoint(self, name: str, entry: dict[str, Any]) -> Path:
        manifest = self._read_remote_manifest(name)
        if manifest is None:
            raise StorageError(f"{self._key(name, MANIFEST_NAME)} is missing or not a valid manifest.")
        items: list[tuple[ObjectInfo, Path, str | None]] = []
        staging = self.local_dir / f"{WORK_PREFIX}download-{name}-{uuid.uuid4().hex[:8]}"
        for rel, meta in manifest.get("files", {}).items():
            info = entry["objects"].get(rel)
            if info is None or info.size != meta["size"]:
                raise StorageError(f"{self._key(name, rel)} is missing or has the wrong size.")
            items.append((info, staging / rel, meta["sha256"]))
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            log.info("downloading checkpoint %s", self._key(name))
            self._transfers.download_verified(items, self.uri.bucket, f"download {name}")
            save_manifest(staging, manifest)
            final = self.local_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            return final
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove_incomplete_checkpoints(self) -> list[Path | str]:
        """Delete incomplete checkpoints locally and in S3 (not those this session is uploading),
        and those `latest_checkpoint()` rejected as corrupt."""
        removed = super().remove_incomplete_checkpoints()
        with self._lock:
            in_flight = set(self._in_flight)
        if not in_flight:
            for scratch in self.local_dir.glob(f"{WORK_PREFIX}*"):
                shutil.rmtree(scratch, ignore_errors=True)
        try:
            for name, entry in self._remote_checkpoints().items():
                if name in in_flight:
                    continue
                if name in self._rejected or not entry["manifest"] or not self._remote_complete(name, entry):
                    log.info("removing incomplete checkpoint %s", self._key(name))
                    self._delete_checkpoint(name, entry)
                    removed.append(str(self._key(name)))
        except KubetuneError:
            raise
        except Exception as exc:
            raise translate(exc, str(self.uri), field="output.path", action="clean up") from None
        return removed

    def _read_json(self, uri: S3Uri) -> dict[str, Any] | None:
        """A JSON object stored at `uri`; None if there is none or it is not a JSON object."""
        try:
            value = json.loads(self.client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read())
        except ValueError:
            return None
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
        return value if isinstance(value, dict) else None

    def _read_remote_manifest(self, name: str) -> dict[str, Any] | None:
        manifest = self._read_json(self._key(name, MANIFEST_NAME))
        return manifest if manifest is not None and isinstance(manifest.get("files"), dict) else None

    def _remote_complete(self, name: str, entry: dict[str, Any]) -> bool:
        """A manifest that parses and lists only files present in S3 with their recorded sizes."""
        manifest = self._read_remote_manifest(name)
        if manifest is None:
            return False
        objects = entry["objects"]
        return all(rel in objects and objects[rel].size == meta.get("size") for rel, meta in manifest["files"].items())

    # -- status -------------------------------------------------------------------------------

    def write_status(self, status: dict[str, Any], *, force: bool = False) -> None:
        """Write status.json locally now; upload it at most every `status_interval` seconds in the
        background, or right away (blocking) with `force=True` (use it for final phases).
        A change of `phase` (e.g. to Failed/Interrupted) is uploaded at once, as with `force`;
        except `Succeeded`, which is only written locally here: `finalize()` uploads it once every
        output is stored and verified, or replaces it with `Failed` if that did not happen.
        `lastCheckpoint` is set to the newest complete checkpoint's S3 URI at upload time (a
        caller's local path or None is replaced: the operator can only read S3), so it is current
        even for a status written while a checkpoint upload was running."""
        status = dict(status)
        status.setdefault("updatedAt", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with self._lock:
            force = force or (self._status is not None and status.get("phase") != self._status.get("phase"))
            self._status = status
            due = time.monotonic() - self._status_uploaded_at >= self.status_interval
            queue = not force and due and not self._status_queued and not self._closed
            if queue:
                self._status_queued = True
        self._write_local_status(self._render_status(status))
        if force:
            self._upload_status(raise_errors=False)
        elif queue:
            self._status_pool.submit(self._upload_status)

    def _render_status(self, status: dict[str, Any]) -> dict[str, Any]:
        rendered = dict(status)
        if self._last_uri and not str(rendered.get("lastCheckpoint") or "").startswith("s3://"):
            rendered["lastCheckpoint"] = self._last_uri
        return json.loads(redact(json.dumps(rendered, default=str)))

    def _upload_status(self, raise_errors: bool = False, *, final: bool = False) -> None:
        with self._lock:
            status, self._status_queued = self._status, False
            if status is not None and status.get("phase") == SUCCEEDED and not final:
                return  # success is published by finalize() only, after every upload verified
            self._status_uploaded_at = time.monotonic()
        if status is None:
            return
        text = self._write_local_status(self._render_status(status))
        uri = self._key(STATUS_NAME)
        try:
            self.client.put_object(
                Bucket=uri.bucket, Key=uri.key, Body=text.encode(), ContentType="application/json"
            )
        except Exception as exc:
            error = translate(exc, str(uri), field="output.path", action="write status to")
            if raise_errors:
                raise error from None
            log.warning("%s", error)

    # -- the end ------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the checkpoint uploads queued so far are done (they may have failed)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.result()

    def finalize(self) -> None:
        """Upload everything else in `local_dir`, wait for every upload, verify, and raise if any
        failed: only after this returns may the run report success."""
        self.wait()
        files = [
            p for p in sorted(self.local_dir.rglob("*"))
            if p.is_file() and self._is_final_output(p.relative_to(self.local_dir))
        ]
        started: list[tuple[Any, S3Uri, Digests]] = []
        for file in files:
            uri = self._key(file.relative_to(self.local_dir).as_posix())
            digests = file_digests(file, self.settings)
            started.append((self._transfers.start_upload(file, uri, digests), uri, digests))
        for future, uri, digests in started:
            try:
                future.result()
                self._transfers.verify_upload(uri, digests)
            except Exception as exc:
                self._fail(exc, str(uri), "upload")
        self._status_pool.submit(lambda: None).result()  # a queued status upload goes first
        with self._lock:
            errors = list(self._errors)
        if errors:
            permanent = [e for e in errors if isinstance(e, SpecError)]
            if len(errors) == 1 or permanent:
                error: KubetuneError = (permanent or errors)[0]
            else:
                listed = "; ".join(str(e) for e in errors[:5])
                error = StorageError(f"{len(errors)} uploads to {self.uri} failed: {listed}")
            with self._lock:  # the run must not be reported as a success
                if self._status is not None and self._status.get("phase") == SUCCEEDED:
                    self._status = {**self._status, "phase": "Failed", "message": str(error)[:500]}
            self._upload_status(raise_errors=False)
            raise error
        self._upload_status(raise_errors=True, final=True)
        log.info("all outputs stored under %s (%d files)", self.uri, len(files))

    @staticmethod
    def _is_final_output(relative: Path) -> bool:
        top = relative.parts[0]
        if CHECKPOINT_RE.match(top) and len(relative.parts) > 1:
            return False  # handled (and verified) by the checkpoint uploads
        if top.startswith(WORK_PREFIX) or relative.name == STATUS_NAME:
            return False
        return not (relative.name.endswith(".tmp") or PART_MARKER in relative.name)

    def close(self) -> None:
        """Wait for queued uploads (so completed checkpoints land), then stop; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing_since = time.monotonic()  # a wait for other nodes' files is cut short
        with contextlib.suppress(Exception):
            self.wait()
        with contextlib.suppress(Exception):
            self._upload_status()
        self._checkpoint_pool.shutdown(wait=True)
        self._status_pool.shutdown(wait=True)
        with contextlib.suppress(Exception):
            self._transfers.close()


__all__ = ["S3OutputSession", "list_checkpoints", "read_manifest"]
