"""The decision logic of InferenceService, as plain functions over dicts (pure: no I/O).

`reconcile_service(cr, observed, now)` looks at an InferenceService and what exists around it
(its Deployment, Service and HPA, the S3 Secret, the training jobs it references) and returns a
`ServingPlan`: objects to create, merge patches, deletions, the new status and the events. The
kopf handlers run it through the operator's one loop (`apply.reconcile_resource`: observe, decide, act);
running it twice on the same world changes nothing.

Lifecycle:
- invalid spec -> Failed (InvalidSpec); the children, if any, are left as they are;
- a missing Secret or a referenced job that does not exist / has not Succeeded -> Pending with
  DependenciesReady=False (WaitingForReference names the job and its phase); a referenced job
  that Failed -> Failed (ReferenceFailed). A service that is already deployed keeps serving
  what it serves while a change waits for its references;
- dependencies ready: Deployment + Service (+ HPA when minReplicas < maxReplicas) are created;
- a spec change (model, engine arguments, resources, ...) patches the Deployment's pod template:
  a rolling update with maxUnavailable 0 (no capacity lost);
- adapters live in the ConfigMap `<name>-isvc-adapters` (the resolved set). That is all an
  adapter-only change touches, with either engine: the pods' `adapters` sidecar loads new adapters
  into the running server and unloads removed ones (the runtime LoRA API of vLLM, or of
  `kubetune serve`), and pods started later read the same ConfigMap, so nothing restarts (event
  AdaptersUpdated). Only turning vLLM's LoRA support on or off (the first adapter, the last one
  removed) changes the pod template;
- minReplicas == maxReplicas: no HPA, `spec.replicas` (what `kubectl scale` sets through the
  scale subresource) or minReplicas sets the Deployment's replicas; otherwise the HPA owns them;
- status: phase Deploying until a replica is ready, then Ready (Progressing=True during a
  rollout); a Deployment past its progress deadline -> Failed (ProgressDeadlineExceeded);
  url, replicas/readyReplicas/desiredReplicas, selector, the served model and adapter names,
  conditions, observedGeneration;
- an API key by default: unless spec.env sets KUBETUNE_API_KEY, the operator creates the Secret
  `<name>-isvc-api-key` (owned by the service, a random key) before the Deployment that
  references it; status.apiKeySecret names the Secret (never the key);
- a call the operator's RBAC forbids (403) does not stop the other changes: each is tried, and
  the refused ones are reported as Ready=False (reason Forbidden, naming the verb and resource)
  and a Warning event, instead of failing silently in the operator's log;
- deleting the InferenceService deletes its children through their owner references.
"""

from __future__ import annotations

import copy
import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator.kube import KubeError
from kubetune.operator.plan import Event, Plan, StatusDecisions
from kubetune.operator.references import (
    REFERENCE_FAILED,
    DependencyChecks,
    reference_key,
    service_references,
)
from kubetune.operator.resources import InferenceServiceSpec
from kubetune.operator.serving.render import (
    ANNOTATION_SPEC_HASH,
    API_KEY_SECRET_KEY,
    KIND,
    ResolvedModels,
    ServingOptions,
    api_key_source,
    render_adapters_config_map,
    render_api_key_secret,
    render_deployment,
    render_hpa,
    render_pdb,
    render_scaled_object,
    render_service,
    runtime_adapters,
    selector_string,
    served_name,
    service_names,
    url_of,
)
from kubetune.operator.status import (
    FAILED,
    INSUFFICIENT_GPU_MEMORY,
    PENDING,
    READY_TO_START,
    SPEC_VALID,
    now_iso,
    set_condition,
    summary_conditions,
)
from kubetune.operator.validation import serving_memory_refusal, validate_resource
from kubetune.trainer.api.errors import SpecErrors

log = logging.getLogger("kubetune.operator")

DEPLOYING, READY = "Deploying", "Ready"
COND_READY = "Ready"
"""At least one replica is available (serving)."""
COND_PROGRESSING = "Progressing"
"""A rollout is in progress (True) or complete (False, reason RolloutComplete)."""
CHILD_KINDS = ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget")
KEDA_RESOURCE = "scaledobjects.keda.sh"


@dataclass
class ServingObserved:
    """What the handler saw around the InferenceService."""

    deployment: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    hpa: dict[str, Any] | None = None
    pdb: dict[str, Any] | None = None
    adapters_config: dict[str, Any] | None = None
    """The ConfigMap with the current adapter set."""
    secret_found: bool | None = None
    """None when no Secret is referenced."""
    references: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """`Kind/name` of each referenced job -> the job, or None when it does not exist."""
    scaled_object: dict[str, Any] | None = None
    """The KEDA ScaledObject (minReplicas 0)."""
    keda: bool | None = None
    """Whether KEDA's ScaledObject CRD is installed (None: not asked, the service does not scale to zero)."""
    foreign: list[str] = field(default_factory=list)
    """Children's names taken by objects this resource does not own."""


ServingPlan = Plan
"""The serving decision's plan: the shared `Plan` (it uses every field)."""


def merge_diff(old: Any, new: Any) -> Any:
    """A JSON merge patch turning `old` into `new` (keys only in `old` -> None)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            patch[key] = merge_diff(old[key], value)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def _hash_of(obj: dict[str, Any] | None) -> str | None:
    return (((obj or {}).get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)


def _true(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


class _ServiceReconciler(DependencyChecks, StatusDecisions):
    def __init__(self, cr: dict[str, Any], observed: ServingObserved, now: datetime.datetime, options: ServingOptions):
        self.cr = cr
        self.obs = observed
        self.ts = now_iso(now)
        self.options = options
        self.meta = cr.get("metadata") or {}
        self.name = self.meta["name"]
        self.namespace = self.meta.get("namespace") or "default"
        self.generation = self.meta.get("generation")
        self.status: dict[str, Any] = copy.deepcopy(cr.get("status") or {})
        self.plan = ServingPlan(status=self.status)
        self.child, _ = service_names(self.name)

    # -- the rules -----------------------------------------------------------------------
    def run(self) -> ServingPlan:
        self.status["observedGeneration"] = self.generation
        try:
            spec: InferenceServiceSpec = validate_resource(self.cr)  # type: ignore[assignment]
        except SpecErrors as exc:
            self.condition(SPEC_VALID, False, "InvalidSpec", str(exc))
            self.transition(FAILED, "InvalidSpec", str(exc), "Warning")
            self.follow_deployment(phase_override=False)
            return self.plan
        self.condition(SPEC_VALID, True, "Valid", "the spec is valid")
        if self.obs.foreign:
            message = (f"{', '.join(self.obs.foreign)} exist(s) but belong(s) to something else; delete or rename "
                       "it, or give this InferenceService another name.")
            self.condition(READY_TO_START, False, "NameConflict", message)
            self.transition(FAILED, "NameConflict", message, "Warning")
            return self.plan
        if spec.scales_to_zero and self.obs.keda is False:
            message = (f"minReplicas 0 (scale to zero) needs KEDA, and the cluster serves no {KEDA_RESOURCE} "
                       "(its CRD is not installed): install KEDA (https://keda.sh), or set minReplicas to 1 or more.")
            self.condition(READY_TO_START, False, "KedaNotInstalled", message)
            self.transition(FAILED, "KedaNotInstalled", message, "Warning")
            return self.plan
        models = self.dependencies(spec)
        if models is None:
            if self.obs.deployment is not None:
                # Already serving: keep serving the current version; the change waits.
                self.follow_deployment(phase_override=False)
            return self.plan
        if self.cannot_start(spec):
            return self.plan
        self.ensure_children(spec, models)
        self.served_status(spec, models)
        self.follow_deployment(phase_override=True)
        return self.plan

    def dependencies(self, spec: InferenceServiceSpec) -> ResolvedModels | None:
        resolved = self.resolve_dependencies(spec, service_references(spec))
        if resolved is None:
            return None
        self.condition(READY_TO_START, True, "Ready", "model, adapters and credentials are available")

        def location(source: Any) -> str:
            return source.uri if source.uri is not None else resolved[reference_key(source.fromJob)]

        return ResolvedModels(location(spec.model), {a.name: location(a) for a in spec.adapters})

    def cannot_start(self, spec: InferenceServiceSpec) -> bool:
        """Refuse a model that cannot start in its GPUs' memory before any pod is scheduled (a
        pod would only crash-loop in vLLM's start-up); a model `fromJob` is sized by that job's
        base model. Already serving: the current version keeps serving, the change waits."""
        job = self.obs.references.get(reference_key(spec.model.fromJob)) if spec.model.fromJob else None
        refusal = serving_memory_refusal(spec, self.cr, default_gib=self.options.gpu_memory_gib, job=job)
        if refusal is None:
            return False
        changed = self.condition(SPEC_VALID, False, INSUFFICIENT_GPU_MEMORY, refusal)
        if self.obs.deployment is None:
            self.transition(FAILED, INSUFFICIENT_GPU_MEMORY, refusal, "Warning")
        else:
            if changed:
                self.event("Warning", INSUFFICIENT_GPU_MEMORY, f"the update waits (the current version keeps serving): {refusal}")
            self.follow_deployment(phase_override=False)
        return True

    def reference_failed(self, message: str) -> None:
        if self.obs.deployment is None:  # already serving: keep serving; the condition says why
            self.transition(FAILED, REFERENCE_FAILED, message, "Warning")

    def blocked(self, reason: str, message: str, event_type: str = "Warning") -> None:
        changed = self.condition(READY_TO_START, False, reason, message)
        if self.obs.deployment is None:
            self.transition(PENDING, reason, message, event_type)
        elif changed:
            self.event(event_type, reason, f"the update waits (the current version keeps serving): {message}")
        return None

    def ensure_api_key(self, spec: InferenceServiceSpec) -> None:
        """Name the key's Secret in the status and, for a generated key, ask the shell to create
        it when it may be missing: the first time, with a new Deployment, and after every spec
        change (so that `kubectl apply` recreates one deleted to rotate the key). The operator
        cannot read Secrets (see the chart's RBAC), so it creates and ignores AlreadyExists."""
        source = api_key_source(self.cr, spec)
        recorded = (self.cr.get("status") or {})
        if source.generated and (recorded.get("apiKeySecret") != source.secret or self.obs.deployment is None
                                 or recorded.get("observedGeneration") != self.generation):
            self.plan.api_key_secret = render_api_key_secret(self.cr)
            self.plan.api_key_field = API_KEY_SECRET_KEY
        if source.secret:
            self.status["apiKeySecret"] = source.secret
        else:
            self.status.pop("apiKeySecret", None)

    def ensure_children(self, spec: InferenceServiceSpec, models: ResolvedModels) -> None:
        self.ensure_api_key(spec)
        # The adapters ConfigMap first: pods created by the Deployment below mount it.
        adapters_cm = render_adapters_config_map(self.cr, spec, models)
        adapters_changed = False
        if self.obs.adapters_config is None:
            self.plan.create.append(adapters_cm)
        elif _hash_of(self.obs.adapters_config) != _hash_of(adapters_cm):
            adapters_changed = True
            self.plan.patch.append(("ConfigMap", adapters_cm["metadata"]["name"], {
                "metadata": {"labels": adapters_cm["metadata"]["labels"],
                             "annotations": adapters_cm["metadata"]["annotations"]},
                "data": adapters_cm["data"],
            }))
        deployment = render_deployment(self.cr, spec, models, self.options)
        observed = self.obs.deployment
        if observed is None:
            self.plan.create.append(deployment)
        else:
            patch: dict[str, Any] = {}
            if _hash_of(observed) == _hash_of(deployment) and adapters_changed and runtime_adapters(spec):
                self.event("Normal", "AdaptersUpdated",
                           f"{self.change_summary(spec, models)} (the running pods load them without a restart: "
                           f"runtime LoRA, through ConfigMap {adapters_cm['metadata']['name']})")
            if _hash_of(observed) != _hash_of(deployment):
                current = {k: v for k, v in (observed.get("spec") or {}).items() if k != "replicas"}
                wanted = {k: v for k, v in deployment["spec"].items() if k != "replicas"}
                patch = {
                    "metadata": {"labels": deployment["metadata"]["labels"],
                                 "annotations": deployment["metadata"]["annotations"]},
                    "spec": merge_diff(current, wanted),
                }
                self.event("Normal", "RollingUpdate", f"updating Deployment {self.child}: {self.change_summary(spec, models)}")
            replicas = (observed.get("spec") or {}).get("replicas")
            if not spec.autoscaled and replicas != deployment["spec"]["replicas"]:
                patch.setdefault("spec", {})["replicas"] = deployment["spec"]["replicas"]
                self.event("Normal", "Scaled", f"replicas set to {deployment['spec']['replicas']}")
            elif spec.autoscaled and not spec.scales_to_zero and (replicas or 0) < spec.minReplicas:
                # Back from zero (KEDA's ScaledObject gone): an HPA never scales a target at 0.
                patch.setdefault("spec", {})["replicas"] = spec.minReplicas
                self.event("Normal", "Scaled", f"replicas set to minReplicas {spec.minReplicas}")
            if patch:
                self.plan.patch.append(("Deployment", self.child, patch))

        service = render_service(self.cr, spec)
        if self.obs.service is None:
            self.plan.create.append(service)
        elif _hash_of(self.obs.service) != _hash_of(service):
            # Only the fields we manage (the API server owns clusterIP, nodePorts, ...).
            self.plan.patch.append(("Service", self.child, {
                "metadata": {"labels": service["metadata"]["labels"], "annotations": service["metadata"]["annotations"]},
                "spec": {k: service["spec"][k] for k in ("type", "selector", "ports")},
            }))

        hpa = self.ensure_hpa(spec, observed)
        self.ensure_scaled_object(spec)
        self.ensure_pdb(spec)
        if observed is None:
            kinds = "Deployment, Service" + (", HPA" if hpa is not None else "")
            self.event("Normal", "Created", f"created {kinds} {self.child}")

    def ensure_hpa(self, spec: InferenceServiceSpec, deployment: dict[str, Any] | None) -> dict[str, Any] | None:
        hpa = render_hpa(self.cr, spec)
        if hpa is None and self.obs.hpa is not None:
            self.plan.delete.append(("HorizontalPodAutoscaler", self.child))
            self.event("Normal", "AutoscalingOff", "minReplicas == maxReplicas: HPA deleted, spec.replicas sets the replicas")
        elif hpa is not None and self.obs.hpa is None:
            self.plan.create.append(hpa)
            if deployment is not None:
                self.event("Normal", "AutoscalingOn", f"HPA created: {spec.minReplicas}-{spec.maxReplicas} replicas")
        elif hpa is not None and _hash_of(self.obs.hpa) != _hash_of(hpa):
            self.plan.patch.append(("HorizontalPodAutoscaler", self.child, {
                "metadata": {"labels": hpa["metadata"]["labels"], "annotations": hpa["metadata"]["annotations"]},
                "spec": merge_diff((self.obs.hpa or {}).get("spec") or {}, hpa["spec"]),
            }))
        return hpa

    def ensure_scaled_object(self, spec: InferenceServiceSpec) -> None:
        """KEDA's ScaledObject for minReplicas 0 (created, patched when its spec changes, deleted
        when minReplicas leaves 0; the HPA is then the operator's again)."""
        scaled = render_scaled_object(self.cr, spec, self.options)
        observed = self.obs.scaled_object
        if scaled is None and observed is not None:
            self.plan.delete.append(("ScaledObject", self.child))
            self.event("Normal", "ScaleToZeroOff", "minReplicas is above 0: KEDA's ScaledObject deleted")
        elif scaled is not None and observed is None:
            self.plan.create.append(scaled)
            self.event("Normal", "ScaleToZeroOn", f"KEDA ScaledObject created: 0-{spec.maxReplicas} replicas")
        elif scaled is not None and _hash_of(observed) != _hash_of(scaled):
            self.plan.patch.append(("ScaledObject", self.child, {
                "metadata": {"labels": scaled["metadata"]["labels"], "annotations": scaled["metadata"]["annotations"]},
                "spec": merge_diff((observed or {}).get("spec") or {}, scaled["spec"]),
            }))

    def ensure_pdb(self, spec: InferenceServiceSpec) -> None:
        """The disruption budget follows minReplicas: created from two, deleted below. Its spec
        never changes (one replica at a time), so it is never patched."""
        pdb = render_pdb(self.cr, spec)
        if pdb is not None and self.obs.pdb is None:
            self.plan.create.append(pdb)
        elif pdb is None and self.obs.pdb is not None:
            self.plan.delete.append(("PodDisruptionBudget", self.child))

    def change_summary(self, spec: InferenceServiceSpec, models: ResolvedModels) -> str:
        before = {a.get("name"): a.get("uri") for a in self.status.get("adapters") or []}
        parts = []
        added = [n for n in models.adapters if n not in before]
        removed = [n for n in before if n not in models.adapters]
        changed = [n for n in models.adapters if n in before and before[n] != models.adapters[n]]
        if added:
            parts.append("adapters added: " + ", ".join(added))
        if removed:
            parts.append("adapters removed: " + ", ".join(removed))
        if changed:
            parts.append("adapters changed: " + ", ".join(changed))
        if self.status.get("modelUri") and self.status["modelUri"] != models.model:
            parts.append(f"model {self.status['modelUri']} -> {models.model}")
        return "; ".join(parts) or "pod template changed"

    def served_status(self, spec: InferenceServiceSpec, models: ResolvedModels) -> None:
        base = served_name(self.cr, spec)
        self.status.update(
            url=url_of(self.cr),
            selector=selector_string(self.name),
            engine=spec.engine,
            deploymentName=self.child,
            model=base,
            modelUri=models.model,
            servedModels=[base, *models.adapters],
        )
        if models.adapters:
            self.status["adapters"] = [{"name": n, "uri": u} for n, u in models.adapters.items()]
        else:
            self.status.pop("adapters", None)

    def follow_deployment(self, *, phase_override: bool) -> None:
        dep = self.obs.deployment
        if dep is None:
            if phase_override:
                self.transition(DEPLOYING, "Created", f"created Deployment {self.child}; waiting for the first replica")
                self.condition(COND_READY, False, "Deploying", "no replica is ready yet")
            return
        dspec, dstatus = dep.get("spec") or {}, dep.get("status") or {}
        replicas = int(dstatus.get("replicas") or 0)
        ready = int(dstatus.get("readyReplicas") or 0)
        available = int(dstatus.get("availableReplicas") or 0)
        updated = int(dstatus.get("updatedReplicas") or 0)
        wanted = int(dspec.get("replicas") if dspec.get("replicas") is not None else 1)
        desired = wanted
        if self.obs.hpa is not None:
            desired = int((self.obs.hpa.get("status") or {}).get("desiredReplicas") or wanted)
        self.status.update(replicas=replicas, readyReplicas=ready, updatedReplicas=updated, desiredReplicas=desired)
        if not phase_override:
            return
        generation = (dep.get("metadata") or {}).get("generation")
        seen = dstatus.get("observedGeneration")
        rolled = (generation is None or (seen is not None and seen >= generation)) and updated >= wanted and replicas <= wanted
        progressing = _true(dep, "Progressing") or {}
        if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
            message = (f"Deployment {self.child} made no progress: {progressing.get('message') or ''} "
                       f"(see `kubectl describe pods -l {selector_string(self.name)}`)").strip()
            self.condition(COND_PROGRESSING, False, "ProgressDeadlineExceeded", message)
            self.condition(COND_READY, available > 0, "ReplicasAvailable" if available else "NoReplicaReady",
                           f"{ready}/{wanted} replicas ready")
            self.transition(FAILED, "ProgressDeadlineExceeded", message, "Warning")
            return
        if rolled:
            self.condition(COND_PROGRESSING, False, "RolloutComplete", f"{updated}/{wanted} replicas up to date")
        else:
            self.condition(COND_PROGRESSING, True, "RollingUpdate", f"{updated}/{wanted} replicas updated, {ready} ready")
        if wanted == 0 and replicas == 0 and self.obs.scaled_object is not None:
            self.condition(COND_READY, True, "ScaledToZero", "idle: no replica runs; KEDA starts one on demand")
            self.transition(READY, "ScaledToZero", "idle at zero replicas: the next request waits for a cold start "
                            "(model download and load) once KEDA sees demand")
        elif available > 0:
            self.condition(COND_READY, True, "ReplicasAvailable", f"{ready}/{wanted} replicas ready")
            detail = f"{ready}/{wanted} replicas ready" + ("" if rolled else f", rolling update ({updated} updated)")
            self.transition(READY, "Serving", f"serving {', '.join(self.status.get('servedModels') or [])}: {detail}")
        else:
            self.condition(COND_READY, False, "NoReplicaReady", f"0/{wanted} replicas ready")
            self.transition(DEPLOYING, "PodsStarting",
                            f"waiting for a replica to download and load the model (0/{wanted} ready)")


def reconcile_service(
    cr: dict[str, Any],
    observed: ServingObserved,
    now: datetime.datetime | None = None,
    options: ServingOptions | None = None,
) -> ServingPlan:
    """Decide what to do for one InferenceService (pure: no I/O)."""
    now = now or datetime.datetime.now(datetime.UTC)
    plan = _ServiceReconciler(cr, observed, now, options or ServingOptions()).run()
    summary_conditions(plan.status, KIND, now=now_iso(now), generation=(cr.get("metadata") or {}).get("generation"))
    return plan


def report_forbidden(cr: dict[str, Any], plan: Plan, forbidden: list[KubeError]) -> None:
    """Ready=False (reason Forbidden) and a Warning event naming each refused call, so that a
    missing RBAC grant shows in `kubectl describe` instead of only in the operator's log. With
    nothing refused there is nothing to do: the decision set Ready from what it observed."""
    if not forbidden:
        return
    calls = sorted({exc.permission() for exc in forbidden})
    message = (f"the operator is not allowed to {'; '.join(calls)} (HTTP 403): the change is not applied. "
               "Grant it to the operator's ServiceAccount (the Helm chart's RBAC does: upgrade the chart).")
    generation = (cr.get("metadata") or {}).get("generation")
    set_condition(plan.status, COND_READY, False, "Forbidden", message, now=now_iso(), generation=generation)
    before = _true(cr, COND_READY) or {}
    now = _true({"status": plan.status}, COND_READY) or {}
    if before.get("reason") == "Forbidden" and before.get("message") == now.get("message"):
        # Still refused, as reported: keep the transition time, post no new event (the timer
        # retries every few seconds).
        now["lastTransitionTime"] = before.get("lastTransitionTime", now.get("lastTransitionTime"))
        return
    log.warning("%s %s/%s: %s", KIND, cr["metadata"]["namespace"], cr["metadata"]["name"], message)
    plan.events.append(Event("Warning", "Forbidden", message))
