{{/* Chart name, truncated to a DNS label. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, unless the release name already contains the chart name. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "true" when kopf peering is on: forced, or more than one replica. */}}
{{- define "kubetune.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{- define "kubetune.peeringName" -}}
{{- default (include "kubetune.fullname" .) .Values.peering.name }}
{{- end }}

{{/* kopf peers cluster-wide (ClusterKopfPeering) when it watches the whole cluster. */}}
{{- define "kubetune.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{- define "kubetune.webhookName" -}}
{{- printf "%s-webhook" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.webhookSecret" -}}
{{- if .Values.webhook.certManager.enabled }}
{{- printf "%s-tls" (include "kubetune.webhookName" .) }}
{{- else }}
{{- required "webhook.existingSecret is required when webhook.certManager.enabled is false" .Values.webhook.existingSecret }}
{{- end }}
{{- end }}

{{/*
The operator's API access, and nothing more (tests/test_chart.py compares it with a recorded
run of the operator and with the calls in operator/handlers.py, kube.py and serving.py):
- its custom resources: kopf lists/watches them and patches finalizers and annotations; the
  handlers read them (and referenced jobs) and patch their status;
- batch Jobs (training): kopf watches them (job-changed); the handlers list, create, get (after
  a create conflict) and patch them (suspend);
- apps Deployments (InferenceService): kopf watches them (deployment-changed); the handlers
  get, create and patch them (rolling updates);
- HorizontalPodAutoscalers (InferenceService): get, create, patch, delete (autoscaling off);
- PodDisruptionBudgets (InferenceService, from two replicas): get, create, delete (below two;
  never patched: their spec does not change);
- KEDA ScaledObjects (InferenceService with minReplicas 0): get, create, patch, delete (minReplicas
  above 0 again); whether KEDA is installed is a discovery request (GET /apis/keda.sh/v1alpha1),
  which needs no grant;
- Kueue Workloads: list only, for a queued job whose Job Kueue holds suspended: the Workload
  owned by that Job (Kueue's kueue.x-k8s.io/job-uid label selects it) says why it waits and
  whether it was preempted (operator/training/kueue.py); no watch, the timer re-reads it;
- PodGroups (a training job with spec.gang: coscheduling's scheduling.x-k8s.io or Volcano's
  scheduling.volcano.sh): create only, before each attempt's Job; AlreadyExists is fine and
  nothing is read back. Whether the CRD is installed is a discovery request (no grant);
- ConfigMaps: get, create (the resolved spec, the adapters set), patch (an InferenceService's
  adapters change); Services: get, create, patch (the headless training Service, the
  InferenceService's Service);
- Secrets: create only, never get/list/watch: the generated API keys of InferenceServices
  (created if absent, AlreadyExists ignored, never read back), and whether a job's S3 Secret
  exists, asked as a server-side dry-run create (409 = it exists; nothing stored or read). RBAC
  cannot narrow `get` to Secrets whose names come from users, so `get` would read them all;
- Events: create (ours and kopf's).
A call refused with 403 shows on the resource (InferenceService: Ready=False, reason Forbidden,
naming the verb and resource, and a Warning event).
Training children are never deleted by the operator: they carry owner references and the
garbage collector removes them with their resource.
*/}}
{{- define "kubetune.rules" -}}
- apiGroups: [kubetune.io]
  resources: [finetunejobs, alignmentjobs, inferenceservices]
  verbs: [get, list, watch, patch]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status, alignmentjobs/status, inferenceservices/status]
  verbs: [patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, create, patch, delete]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list]
- apiGroups: [scheduling.x-k8s.io, scheduling.volcano.sh]
  resources: [podgroups]
  verbs: [create]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{- define "kubetune.peeringRules" -}}
{{- if include "kubetune.peering" . }}
- apiGroups: [kopf.dev]
  resources: [{{ if include "kubetune.clusterwide" . }}clusterkopfpeerings{{ else }}kopfpeerings{{ end }}]
  verbs: [list, watch, patch]
{{- end }}
{{- end }}

{{/* The console (console.enabled): its own name and selector, apart from the operator's pods. */}}
{{- define "kubetune.consoleName" -}}
{{- printf "%s-console" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.consoleSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-console" (include "kubetune.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kubetune.consoleLabels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.consoleSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/component: console
{{- end }}

{{- define "kubetune.consoleServiceAccountName" -}}
{{- if .Values.console.serviceAccount.create }}
{{- default (include "kubetune.consoleName" .) .Values.console.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.console.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetune.consoleTokenSecret" -}}
{{- default (printf "%s-token" (include "kubetune.consoleName" .)) .Values.console.token.existingSecret }}
{{- end }}

{{/*
The console's API access in cluster mode, and nothing more (operator/console/cluster.py;
tests/test_console_cluster.py compares it with the real API server's audit log of the console):
- the three kinds: list (the Jobs table, one namespace or all), get (a resource's page), create
  (Apply); never update, patch or delete;
- events: list (a resource's page); pods: list (its pods, by the selector labels) and pods/log:
  get (their logs). No Secrets, ConfigMaps or Jobs.
With impersonation (console.impersonation.enabled) every call is made as the user the auth
proxy names, and the console's own identity needs only the `impersonate` verb on users and
groups: what a user may do is that user's own RBAC.
*/}}
{{- define "kubetune.consoleRules" -}}
{{- if .Values.console.impersonation.enabled }}
- apiGroups: [""]
  resources: [users, groups]
  verbs: [impersonate]
{{- else }}
- apiGroups: [kubetune.io]
  resources: [finetunejobs, alignmentjobs, inferenceservices]
  verbs: [get, list, create]
- apiGroups: [""]
  resources: [events, pods]
  verbs: [list]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
{{- end }}
{{- end }}
