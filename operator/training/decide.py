"""The decision logic of the training kinds, as plain functions over dicts.

`reconcile(cr, observed, now)` looks at a FineTuneJob/AlignmentJob and what exists around it
(its Jobs, ConfigMap, Service, the S3 Secret, referenced jobs, the trainer's status.json) and
returns a `Plan`: objects to create, patches, the new status and the events to post. The kopf
handlers only gather the observations and carry the plan out, so every rule here is tested
without a cluster, and running it twice on the same world changes nothing (idempotent: an
operator restart in the middle creates no duplicates, children are found by name and owner).

Lifecycle:
- invalid spec -> Failed (InvalidSpec), until the spec is fixed;
- a spec whose memory estimate exceeds spec.gpuMemoryGiB (or the operator's default) on
  nodes x gpusPerNode -> Failed (InsufficientGPUMemory, saying what would fit) before anything
  is created, until the spec is changed;
- missing Secret (spec.storage.secretRef, else the operator's default --default-s3-secret) or
  referenced job -> Pending with DependenciesReady=False (waits; see `references.py`);
  a referenced job that failed -> Failed (ReferenceFailed);
- start: ConfigMap (the resolved spec, never changed afterwards), headless Service, Job attempt 1;
- with an `s3://` `data.cache` (and no streaming) a one-pod CPU-only prepare Job comes first:
  it tokenizes the datasets once into the cache (`kubetune prepare`) while the resource stays
  Pending (Preparing, DataPrepared=False); when it completes (DataPrepared=True) the training Job
  is created, and its failure fails the resource (PrepareFailed). Gang restarts never rerun it;
- Job active -> Running; Job complete -> Succeeded;
- Job failed: exit code 2 (podFailurePolicy) -> Failed (ConfigError); deadline -> Failed; a pod
  preempted, evicted or drained (DisruptionTarget, podFailurePolicy) -> the gang restarts as the
  next attempt without counting against backoffLimit (status.preemptions);
  otherwise the whole gang restarts as attempt n+1 (a new Job; the trainer resumes from the last
  complete checkpoint) while status.failures <= backoffLimit, else Failed (BackoffLimitExceeded);
- queued (Kueue's queue-name label): the Job waits suspended, Queued with Kueue's reason from its
  Workload; a Kueue preemption suspends it (Queued, PreemptedByKueue, status.preemptions + 1,
  the same attempt resumes when re-admitted);
- `suspend: true` suspends the Job (pods stop, saving a checkpoint on SIGTERM) -> Suspended;
- spec.training changed after start -> SpecValid=False (TrainingSpecImmutable) + a Warning
  event; the job keeps training the original spec.
"""

from __future__ import annotations

import copy
import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator.common import (
    ANNOTATION_ATTEMPT,
    ANNOTATION_TRAINING_HASH,
    LABEL_ATTEMPT,
    child_names,
    queued,
)
from kubetune.operator.kube import KubeError
from kubetune.operator.plan import Event, Plan, StatusDecisions
from kubetune.operator.references import (
    REFERENCE_FAILED,
    DependencyChecks,
    output_uri_of,
    training_references,
)
from kubetune.operator.resources import TERMINAL_PHASES, ClusterFields
from kubetune.operator.status import (
    COND_FAILED,
    COND_RUNNING,
    COND_SUCCEEDED,
    COND_SUSPENDED,
    COND_SYNCED,
    FAILED,
    INSUFFICIENT_GPU_MEMORY,
    PENDING,
    QUEUED,
    READY_TO_START,
    RUNNING,
    SPEC_VALID,
    SUCCEEDED,
    SUSPENDED,
    TrainerReport,
    get_condition,
    now_iso,
    parse_time,
    parse_trainer_status,
    progress_of,
    set_condition,
    summary_conditions,
)
from kubetune.operator.training.kueue import view as kueue_view
from kubetune.operator.training.render import (
    DISRUPTION_CONDITION,
    POD_GROUP_API,
    RenderOptions,
    prepare_job_name,
    render_config_map,
    render_job,
    render_pod_group,
    render_prepare_job,
    render_service,
    training_hash,
)
from kubetune.operator.validation import memory_refusal, validate_resource
from kubetune.trainer.api.errors import SpecErrors
from kubetune.trainer.artifacts.datacache import cache_location, cluster_default_cache, prepare_skip_reason

log = logging.getLogger("kubetune.operator")

COND_DATA_PREPARED = "DataPrepared"
"""The datasets are tokenized into data.cache (False while the prepare Job runs, or after it failed)."""
PREPARING, PREPARED, PREPARE_FAILED = "Preparing", "Prepared", "PrepareFailed"
PREEMPTED_BY_KUEUE = "PreemptedByKueue"
"""Reason of a Queued job whose Job Kueue suspended after it ran (it resumes when re-admitted)."""
EVICTED_BY_KUEUE = "EvictedByKueue"
"""Reason of a Queued job whose Workload Kueue evicted for another cause than a preemption (e.g.
PodsReadyTimeout: waitForPodsReady gave up on a gang the nodes could not place)."""


@dataclass
class Observed:
    """What the handler saw around the custom resource."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    """batch/v1 Jobs owned by the resource (every attempt still present)."""
    config_map: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    secret_found: bool | None = None
    """None when no Secret is referenced."""
    references: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """baseModelFrom/rewardModelFrom -> the referenced resource, or None when it does not exist."""
    trainer_status: dict[str, Any] | None = None
    """The trainer's status.json, when readable."""
    workloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Job name -> Kueue's Workload, for the Jobs Kueue holds suspended (`kueue.py`)."""
    pod_group_api: bool | None = None
    """With spec.gang, before the job starts: whether the API server serves its PodGroup kind
    (discovery); None when not asked."""


def job_attempt(job: dict[str, Any]) -> int:
    meta = job.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(ANNOTATION_ATTEMPT) or (meta.get("labels") or {}).get(LABEL_ATTEMPT)
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


class _Reconciler(DependencyChecks, StatusDecisions):
    def __init__(self, cr: dict[str, Any], observed: Observed, now: datetime.datetime, options: RenderOptions):
        self.cr = cr
        self.obs = observed
        self.now = now
        self.ts = now_iso(now)
        self.options = options
        self.kind = cr["kind"]
        self.meta = cr.get("metadata") or {}
        self.name = self.meta["name"]
        self.namespace = self.meta.get("namespace") or "default"
        self.generation = self.meta.get("generation")
        self.status: dict[str, Any] = copy.deepcopy(cr.get("status") or {})
        self.plan = Plan(status=self.status)
        self.names = child_names(self.kind, self.name)

    # -- helpers -------------------------------------------------------------------------
    def drop_condition(self, type_: str) -> None:
        conditions = [c for c in self.status.get("conditions") or [] if c.get("type") != type_]
        if conditions:
            self.status["conditions"] = conditions
        else:
            self.status.pop("conditions", None)

    def finish(self, phase: str, reason: str, message: str) -> None:
        event_type = "Normal" if phase == SUCCEEDED else "Warning"
        self.transition(phase, reason, message, event_type)
        self.status.setdefault("completionTime", self.ts)
        self.condition(COND_SUCCEEDED if phase == SUCCEEDED else COND_FAILED, True, reason, message)
        if self.status.get("startTime"):
            self.condition(COND_RUNNING, False, reason, "the job has finished")

    # -- the rules -----------------------------------------------------------------------
    def run(self) -> Plan:
        phase = self.status.get("phase")
        if not needs_reconcile(self.cr):
            return self.plan
        retry_invalid = phase in TERMINAL_PHASES
        try:
            spec = validate_resource(self.cr)
        except SpecErrors as exc:
            self.condition(SPEC_VALID, False, "InvalidSpec", str(exc))
            self.finish(FAILED, "InvalidSpec", str(exc))
            self.status["observedGeneration"] = self.generation
            return self.plan
        if retry_invalid:
            self.drop_condition(COND_FAILED)
            self.status.pop("completionTime", None)
        self.status["observedGeneration"] = self.generation
        current_hash = training_hash((self.cr.get("spec") or {}).get("training"))
        self.adopt()
        started_hash = self.status.get("trainingHash")
        if started_hash and started_hash != current_hash:
            message = (
                "spec.training changed after the job started; the change is ignored and the job "
                "keeps training the original spec. Revert it, or create a new job."
            )
            if self.condition(SPEC_VALID, False, "TrainingSpecImmutable", message):
                self.event("Warning", "TrainingSpecImmutable", message)
        else:
            self.condition(SPEC_VALID, True, "Valid", "the spec is valid")

        if not started_hash:
            # Refused before anything is scheduled: a job that cannot fit would only OOM later.
            refusal = memory_refusal(spec, self.cr, default_gib=self.options.gpu_memory_gib)
            if refusal:
                self.condition(SPEC_VALID, False, INSUFFICIENT_GPU_MEMORY, refusal)
                self.finish(FAILED, INSUFFICIENT_GPU_MEMORY, refusal)
                return self.plan
            references = self.dependencies(spec)
            if references is None:
                return self.plan
            self.start(spec, references, current_hash)
            return self.plan
        self.ensure_support_objects(spec, current_hash)
        if self.preparing(spec):
            self.follow_prepare(spec)
        else:
            self.follow_job(spec)
        return self.plan

    def adopt(self) -> None:
        """Pick up children that exist although the status does not know them (an operator
        restart between creating them and writing the status)."""
        attempts = [job_attempt(j) for j in self.obs.jobs]
        if attempts and max(attempts) > (self.status.get("attempts") or 0):
            self.status["attempts"] = max(attempts)
            self.status["jobName"] = self.names.job(max(attempts))
        if self.status.get("attempts") and "failures" not in self.status:
            # Started by an operator without `failures`: its preemptions were all gang restarts.
            self.status["failures"] = max(0, self.status["attempts"] - 1 - (self.status.get("preemptions") or 0))
        if not self.status.get("trainingHash") and (self.obs.jobs or self.obs.config_map):
            annotations = ((self.obs.config_map or {}).get("metadata") or {}).get("annotations") or {}
            self.status["trainingHash"] = annotations.get(ANNOTATION_TRAINING_HASH) or training_hash(
                (self.cr.get("spec") or {}).get("training")
            )
            self.status.setdefault("startTime", self.ts)
            self.status.setdefault("outputUri", output_uri_of(self.cr))

    def dependencies(self, spec: ClusterFields) -> dict[str, str] | None:
        """Resolved references, or None after setting why the job cannot start yet. The Secret
        checked is the one the pods will reference: spec.storage.secretRef, else the operator's
        default (--default-s3-secret)."""
        references = self.resolve_dependencies(spec, training_references(spec), first_waiting_blocks=True)
        if references is None:
            return None
        if spec.gang is not None and self.obs.pod_group_api is False:
            api = POD_GROUP_API[spec.gang.scheduler]
            return self.blocked("PodGroupNotInstalled", f"spec.gang.scheduler is {spec.gang.scheduler}, but the cluster "
                                f"serves no PodGroup of {api}: install that scheduler (its CRD), or remove spec.gang.")
        self.condition(READY_TO_START, True, "Ready", "dependencies are available")
        return references

    def reference_failed(self, message: str) -> None:
        self.finish(FAILED, REFERENCE_FAILED, message)

    def blocked(self, reason: str, message: str, event_type: str = "Warning") -> None:
        self.condition(READY_TO_START, False, reason, message)
        self.transition(PENDING, reason, message, event_type)
        return None

    def deadline_left(self, spec: ClusterFields) -> int | None:
        if spec.activeDeadlineSeconds is None:
            return None
        started = parse_time(self.status.get("startTime")) or self.now
        return spec.activeDeadlineSeconds - int((self.now - started).total_seconds())

    def start(self, spec: ClusterFields, references: dict[str, str], current_hash: str) -> None:
        self.status.update(startTime=self.ts, trainingHash=current_hash)
        self.status["outputUri"] = output_uri_of(self.cr)
        for name, uri in references.items():
            self.status["baseModelUri" if name == "baseModelFrom" else "rewardModelUri"] = uri
        if self.obs.config_map is None:
            self.plan.create.append(
                render_config_map(self.cr, spec, namespace=self.namespace, references=references)
            )
        if self.obs.service is None:
            self.plan.create.append(render_service(self.cr, namespace=self.namespace, options=self.options))
        self.create_pod_group(spec)
        if self.has_prepare_step(spec):
            self.create_prepare_job(spec)
            return
        self.start_training(spec)

    def start_training(self, spec: ClusterFields) -> None:
        self.create_job(spec, 1)
        gpus = f" x {spec.gpusPerNode} GPUs" if spec.gpusPerNode else " (no GPUs)"
        self.transition(PENDING, "JobCreated", f"created Job {self.names.job(1)}: {spec.nodes} node(s){gpus}")
        self.condition(COND_RUNNING, False, "PodsStarting", "waiting for the pods to start")

    # -- the prepare step ------------------------------------------------------------------
    def has_prepare_step(self, spec: ClusterFields) -> bool:
        """Whether the datasets are tokenized by a prepare Job before the gang (see
        `kubetune.trainer.train.prepare.prepare_skip_reason`: an s3:// data.cache, no streaming; a
        multi-node job writing to S3 defaults to one, see `cluster_default_cache`)."""
        return prepare_skip_reason(cluster_default_cache(spec.training, spec.nodes)) is None

    def preparing(self, spec: ClusterFields) -> bool:
        """Started, with a prepare step, and no training Job created yet."""
        return self.has_prepare_step(spec) and not self.status.get("attempts")

    def prepare_job(self) -> dict[str, Any] | None:
        wanted = prepare_job_name(self.kind, self.name)
        for job in self.obs.jobs:
            if (job.get("metadata") or {}).get("name") == wanted:
                return job
        return None

    def create_prepare_job(self, spec: ClusterFields) -> None:
        self.plan.create.append(
            render_prepare_job(
                self.cr, spec, namespace=self.namespace, options=self.options,
                active_deadline_seconds=self.deadline_left(spec),
            )
        )
        name = prepare_job_name(self.kind, self.name)
        message = f"created Job {name}: tokenizing the datasets once into {cache_location(cluster_default_cache(spec.training, spec.nodes))} (no GPUs)"
        self.condition(COND_DATA_PREPARED, False, PREPARING, message)
        self.condition(COND_RUNNING, False, PREPARING, "the training pods start when the datasets are tokenized")
        self.transition(PENDING, PREPARING, message)

    def follow_prepare(self, spec: ClusterFields) -> None:
        """Wait for the prepare Job; on success create the training Job (attempt 1)."""
        name = prepare_job_name(self.kind, self.name)
        left = self.deadline_left(spec)
        if left is not None and left <= 0:
            self.condition(COND_DATA_PREPARED, False, "DeadlineExceeded", "the job's deadline passed while preparing")
            self.finish(FAILED, "DeadlineExceeded", f"activeDeadlineSeconds ({spec.activeDeadlineSeconds}) exceeded")
            return
        job = self.prepare_job()
        if job is None:  # never created (operator restart) or deleted by someone: (re)create it
            self.create_prepare_job(spec)
            return
        if job_condition(job, "Complete"):
            message = f"the datasets are tokenized in {cache_location(cluster_default_cache(spec.training, spec.nodes))} (Job {name})"
            if self.condition(COND_DATA_PREPARED, True, PREPARED, message):
                self.event("Normal", PREPARED, message)
            self.start_training(spec)
            return
        failed = job_condition(job, "Failed")
        if failed:
            reason = failed.get("reason") or "Failed"
            detail = failed.get("message") or reason
            if reason == "PodFailurePolicy":
                message = (f"the prepare step refused its configuration (exit code 2): {detail}. See the pod logs "
                           f"(kubectl logs job/{name}); a retry cannot fix it.")
            else:
                message = f"tokenizing the datasets failed ({reason}: {detail}); see kubectl logs job/{name}."
            self.condition(COND_DATA_PREPARED, False, PREPARE_FAILED, message)
            self.finish(FAILED, PREPARE_FAILED, message)
            return
        job_suspended = bool((job.get("spec") or {}).get("suspend"))
        if spec.suspend:
            if not job_suspended:
                self.plan.patch.append(("Job", name, {"spec": {"suspend": True}}))
            self.condition(COND_SUSPENDED, True, "Suspended", "spec.suspend is true")
            self.transition(SUSPENDED, "Suspended", "suspended while preparing the datasets")
            return
        if job_suspended and queued(self.cr):
            self.await_admission(name)
            return
        if job_suspended:
            self.plan.patch.append(("Job", name, {"spec": {"suspend": False}}))
        if self.status.get("phase") == SUSPENDED or job_suspended:
            self.condition(COND_SUSPENDED, False, "Resumed", "spec.suspend is false")
        self.transition(PENDING, PREPARING, f"tokenizing the datasets in Job {name} (no GPUs)")

    def create_pod_group(self, spec: ClusterFields) -> None:
        """With `spec.gang`, the PodGroup the gang's pods join (created if absent, so the
        operator asks for it before each attempt's Job, and first thing at the start)."""
        group = render_pod_group(self.cr, spec, namespace=self.namespace)
        if group is not None and group not in self.plan.create:
            self.plan.create.append(group)

    def create_job(self, spec: ClusterFields, attempt: int) -> None:
        """The attempt's Job, after the PodGroup its pods join (`spec.gang`)."""
        self.create_pod_group(spec)
        self.plan.create.append(
            render_job(
                self.cr, spec, attempt=attempt, namespace=self.namespace, options=self.options,
                active_deadline_seconds=self.deadline_left(spec),
            )
        )
        self.status["attempts"] = attempt
        self.status["jobName"] = self.names.job(attempt)
        self.status.setdefault("failures", 0)

    def ensure_support_objects(self, spec: ClusterFields, current_hash: str) -> None:
        """Recreate a ConfigMap/Service someone deleted (the ConfigMap only while the training
        spec is unchanged: it must hold the spec the job started with)."""
        if self.obs.service is None:
            self.plan.create.append(render_service(self.cr, namespace=self.namespace, options=self.options))
        if self.obs.config_map is None and self.status.get("trainingHash") == current_hash:
            references = {}
            if self.status.get("baseModelUri"):
                references["baseModelFrom"] = self.status["baseModelUri"]
            if self.status.get("rewardModelUri"):
                references["rewardModelFrom"] = self.status["rewardModelUri"]
            self.plan.create.append(render_config_map(self.cr, spec, namespace=self.namespace, references=references))

    def current_job(self) -> dict[str, Any] | None:
        attempt = self.status.get("attempts") or 0
        for job in self.obs.jobs:
            if job_attempt(job) == attempt:
                return job
        return None

    def follow_job(self, spec: ClusterFields) -> None:
        attempt = self.status.get("attempts") or 1
        job = self.current_job()
        trainer = self.trainer_report()
        left = self.deadline_left(spec)
        if job is None:
            if trainer is not None and trainer.phase == SUCCEEDED:
                self.finish(SUCCEEDED, "Completed", "training completed (the Job is gone; status.json says Succeeded)")
                return
            if left is not None and left <= 0:
                self.finish(FAILED, "DeadlineExceeded", f"activeDeadlineSeconds ({spec.activeDeadlineSeconds}) exceeded")
                return
            # Deleted by someone (or never created after a crash): recreate this attempt.
            self.create_job(spec, attempt)
            self.transition(PENDING, "JobCreated", f"created Job {self.names.job(attempt)} (attempt {attempt})")
            return

        if job_condition(job, "Complete"):
            self.finish(SUCCEEDED, "Completed", f"training completed in attempt {attempt}")
            self.status.setdefault("completionTime", job.get("status", {}).get("completionTime") or self.ts)
            return
        failed = job_condition(job, "Failed")
        if failed:
            self.attempt_failed(spec, attempt, failed, left)
            return

        job_suspended = bool((job.get("spec") or {}).get("suspend"))
        if spec.suspend:
            if not job_suspended:
                self.plan.patch.append(("Job", self.names.job(attempt), {"spec": {"suspend": True}}))
            self.condition(COND_SUSPENDED, True, "Suspended", "spec.suspend is true")
            self.condition(COND_RUNNING, False, "Suspended", "the job is suspended")
            self.transition(SUSPENDED, "Suspended", "suspended: the pods are stopped (each saves a checkpoint on SIGTERM)")
            return
        if job_suspended and queued(self.cr):
            self.await_admission(self.names.job(attempt))
            return
        if job_suspended:
            self.plan.patch.append(("Job", self.names.job(attempt), {"spec": {"suspend": False}}))
            self.condition(COND_SUSPENDED, False, "Resumed", "spec.suspend is false")
            self.transition(PENDING, "Resumed", "resumed: the pods restart from the last complete checkpoint")
            return
        if self.status.get("phase") == SUSPENDED:
            self.condition(COND_SUSPENDED, False, "Resumed", "spec.suspend is false")

        jstatus = job.get("status") or {}
        active = int(jstatus.get("active") or 0)
        if active > 0:
            ready = jstatus.get("ready")
            detail = f"{active}/{spec.nodes} pods active" + (f", {ready} ready" if ready is not None else "")
            self.condition(COND_RUNNING, True, "PodsRunning", detail)
            self.transition(RUNNING, "Training", f"attempt {attempt}: {detail}")
        else:
            self.condition(COND_RUNNING, False, "PodsStarting", "waiting for the pods to start")
            if self.status.get("phase") not in (PENDING, RUNNING):
                self.transition(PENDING, "PodsStarting", f"attempt {attempt}: waiting for the pods to start")

    def trainer_report(self) -> TrainerReport | None:
        """The trainer's status.json of this run, checked (`parse_trainer_status`: it is written
        by user code), with its progress and output location copied into the status; None when
        there is none, or it is from an earlier run that wrote to the same location."""
        if self.obs.trainer_status is None:
            return None
        own_output = output_uri_of({**self.cr, "status": {}})
        report, notes = parse_trainer_status(self.obs.trainer_status, own_output)
        if not self.fresh(report):
            return None
        progress = progress_of(report, notes)
        if progress:
            self.status["progress"] = progress
        if report.outputUri:
            self.status["outputUri"] = report.outputUri
        return report

    def fresh(self, report: TrainerReport) -> bool:
        """A status.json from this run, not a previous run that wrote to the same location."""
        started = parse_time(self.status.get("startTime"))
        if not isinstance(report.updatedAt, float) or started is None:
            return True
        return report.updatedAt >= started.timestamp() - 5

    def attempt_failed(self, spec: ClusterFields, attempt: int, failed: dict[str, Any], left: int | None) -> None:
        reason = failed.get("reason") or "Failed"
        detail = failed.get("message") or reason
        if reason == "PodFailurePolicy" and DISRUPTION_CONDITION in detail:
            self.attempt_disrupted(spec, attempt, detail, left)
            return
        if reason == "PodFailurePolicy":
            self.finish(
                FAILED,
                "ConfigError",
                f"the trainer refused its configuration (exit code 2): {detail}. See the pod logs "
                f"(kubectl logs job/{self.names.job(attempt)}); a retry cannot fix it.",
            )
            return
        if reason == "DeadlineExceeded" or (left is not None and left <= 0):
            self.finish(FAILED, "DeadlineExceeded", f"activeDeadlineSeconds ({spec.activeDeadlineSeconds}) exceeded")
            return
        failures = (self.status.get("failures") or 0) + 1  # disruptions and preemptions are not failures
        self.status["failures"] = failures
        if failures > spec.backoffLimit:
            self.finish(
                FAILED,
                "BackoffLimitExceeded",
                f"attempt {attempt} failed ({reason}: {detail}); backoffLimit {spec.backoffLimit} reached "
                f"({failures} failures{self.preemption_note()}).",
            )
            return
        self.restart_gang(spec, attempt, "Restarting", f"attempt {attempt} failed: {reason}",
                          f"attempt {attempt} failed ({reason}: {detail}); restarting the whole gang as attempt "
                          f"{attempt + 1} from the last complete checkpoint.")

    def restart_gang(self, spec: ClusterFields, attempt: int, reason: str, short: str, message: str) -> None:
        """Attempt n+1: a new Job for the whole gang, which resumes from the last checkpoint."""
        self.create_job(spec, attempt + 1)
        self.condition(COND_RUNNING, False, reason, short)
        self.transition(PENDING, reason, message, "Warning")


    def await_admission(self, job: str) -> None:
        """Kueue decides when a queued Job runs: its suspend flag is Kueue's, never patched here.
        The status says why it waits in Kueue's own words (its Workload's QuotaReserved or
        Admitted message). A Job that Kueue evicted was preempted (Evicted reason Preempted; or,
        without a readable Workload, it was Running): its pods saved a checkpoint on SIGTERM, it
        resumes from there when re-admitted (the same attempt) and `status.preemptions` counts it
        once. Another eviction (e.g. waitForPodsReady's PodsReadyTimeout) is EvictedByKueue. The
        reason stays until the Job runs again, so later reconciles keep saying so."""
        queue = queued(self.cr)
        kueue = kueue_view(self.obs.workloads.get(job))
        phase, before = self.status.get("phase"), self.status.get("reason")
        if kueue is not None and kueue.evicted_reason and not kueue.preempted:
            reason = EVICTED_BY_KUEUE
            message = (f"Kueue evicted Job {job} ({kueue.evicted_reason}: {kueue.evicted_message}) and requeued it "
                       f"in queue {queue}; it resumes from its last checkpoint when admitted again")
        elif (kueue is not None and kueue.preempted) or phase == RUNNING or (phase == QUEUED and before == PREEMPTED_BY_KUEUE):
            reason = PREEMPTED_BY_KUEUE
            message = (f"Job {job} was preempted by Kueue (queue {queue}): its pods saved a checkpoint; it resumes "
                       "from there when Kueue admits it again")
            if before != PREEMPTED_BY_KUEUE:
                self.status["preemptions"] = (self.status.get("preemptions") or 0) + 1
        else:
            reason = "WaitingForAdmission"
            message = f"Job {job} waits for Kueue to admit it (queue {queue})"
            if not (kueue and kueue.waiting):
                message += ": quota, priority and fair sharing decide"
        if kueue is not None and kueue.waiting:
            message += f". Kueue: {kueue.waiting}"
        self.condition(COND_RUNNING, False, QUEUED, message)
        self.transition(QUEUED, reason, message)

    def attempt_disrupted(self, spec: ClusterFields, attempt: int, detail: str, left: int | None) -> None:
        """A pod of the gang was preempted, evicted or drained: not the job's fault. The whole gang
        restarts from the last complete checkpoint (the pods saved one on SIGTERM) without using
        up backoffLimit; `status.preemptions` counts these restarts."""
        if left is not None and left <= 0:
            self.finish(FAILED, "DeadlineExceeded", f"activeDeadlineSeconds ({spec.activeDeadlineSeconds}) exceeded")
            return
        self.status["preemptions"] = (self.status.get("preemptions") or 0) + 1
        self.restart_gang(spec, attempt, "Preempted", f"attempt {attempt}: a pod was disrupted",
                          f"attempt {attempt} lost a pod to preemption, eviction or a node drain ({detail}); restarting "
                          f"the gang as attempt {attempt + 1} from the last complete checkpoint. Disruptions do not "
                          f"count against backoffLimit ({self.status['preemptions']} so far).")

    def preemption_note(self) -> str:
        count = self.status.get("preemptions") or 0
        return f", not counting {count} preemption{'s' if count != 1 else ''}" if count else ""


def reconcile(
    cr: dict[str, Any],
    observed: Observed,
    now: datetime.datetime | None = None,
    options: RenderOptions | None = None,
) -> Plan:
    """Decide what to do for one training resource (pure: no I/O)."""
    now = now or datetime.datetime.now(datetime.UTC)
    plan = _Reconciler(cr, observed, now, options or RenderOptions()).run()
    summary_conditions(plan.status, cr["kind"], now=now_iso(now), generation=(cr.get("metadata") or {}).get("generation"))
    return plan


RETRIED_ON_SPEC_CHANGE = ("InvalidSpec", INSUFFICIENT_GPU_MEMORY)
"""Failed reasons a new spec (generation) may fix: the resource is reconciled again then."""


def needs_reconcile(cr: dict[str, Any]) -> bool:
    """Whether reconciling `cr` can change anything: it is in flight, or it failed for its spec
    and the spec has changed since. A finished job is left alone (no reads, no writes)."""
    status = cr.get("status") or {}
    if status.get("phase") not in TERMINAL_PHASES:
        return True
    generation = (cr.get("metadata") or {}).get("generation")
    return (status.get("phase") == FAILED and status.get("reason") in RETRIED_ON_SPEC_CHANGE
            and generation != status.get("observedGeneration"))


def needs_trainer_status(cr: dict[str, Any]) -> str | None:
    """The output location to read status.json from, when the job is in flight."""
    status = cr.get("status") or {}
    if status.get("phase") in TERMINAL_PHASES or not status.get("trainingHash"):
        return None
    if not status.get("attempts"):
        return None  # the prepare Job is still tokenizing: no trainer has written anything yet
    return status.get("outputUri") or output_uri_of(cr)


def report_forbidden(cr: dict[str, Any], plan: Any, forbidden: list[KubeError]) -> None:
    """Condition `Synced` (False, reason Forbidden) and one Warning event naming each refused
    call, so that a missing RBAC grant shows in `kubectl describe`, not only in the operator's
    log. The condition turns True again once every call is allowed. The rest of the status is
    left as it was: the plan assumed its calls succeed."""
    before = get_condition(cr.get("status") or {}, COND_SYNCED) or {}
    generation = (cr.get("metadata") or {}).get("generation")
    if not forbidden:
        if before.get("reason") == "Forbidden":
            set_condition(plan.status, COND_SYNCED, True, "Reconciled", "", now=now_iso(), generation=generation)
        return
    # Not everything the plan describes happened: keep the status (and the events) as they were,
    # so the next pass decides again from what exists, rather than from a Job that was refused.
    plan.status = copy.deepcopy(cr.get("status") or {})
    plan.events = []
    calls = sorted({exc.permission() for exc in forbidden})
    message = (f"the operator is not allowed to {'; '.join(calls)} (HTTP 403): the change is not applied. "
               "Grant it to the operator's ServiceAccount (the Helm chart's RBAC does: upgrade the chart).")
    set_condition(plan.status, COND_SYNCED, False, "Forbidden", message, now=now_iso(), generation=generation)
    if before.get("reason") == "Forbidden" and before.get("message") == message:
        return  # reported already; the timer retries every few seconds
    log.warning("%s %s/%s: %s", cr["kind"], cr["metadata"]["namespace"], cr["metadata"]["name"], message)
    plan.events.append(Event("Warning", "Forbidden", message))
