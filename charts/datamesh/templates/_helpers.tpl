{{/*
Names, labels, image and settings shared by the templates.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "datamesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else the release name (with the chart name
appended unless the release name contains it). Kept to 46 characters so that the longest
suffix ("-operator-catalog", 17) still fits the 63-character limit of labels and names.
*/}}
{{- define "datamesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "datamesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; pass a dict with "ctx" (the root context) and "component". */}}
{{- define "datamesh.labels" -}}
helm.sh/chart: {{ include "datamesh.chart" .ctx }}
{{ include "datamesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: datamesh
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector cannot change). */}}
{{- define "datamesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "datamesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Namespace of the catalog ConfigMaps. */}}
{{- define "datamesh.platformNamespace" -}}
{{- default .Release.Namespace .Values.platformNamespace }}
{{- end }}

{{/* The datamesh image, by digest when one is given. */}}
{{- define "datamesh.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "datamesh.operator.fullname" -}}
{{- printf "%s-operator" (include "datamesh.fullname" .) }}
{{- end }}

{{/*
The operator's leader-election Lease (in the platform namespace); given a dict with "ctx" and
"shard", that shard's own Lease ("<lease>-<shard>"), since each shard elects its own leader.
*/}}
{{- define "datamesh.operator.leaseName" -}}
{{- $ctx := ternary (get . "ctx") . (hasKey . "ctx") }}
{{- $lease := default (include "datamesh.operator.fullname" $ctx) $ctx.Values.operator.leaderElection.leaseName }}
{{- $shard := ternary (get . "shard") "" (hasKey . "shard") }}
{{- if $shard }}
{{- printf "%s-%s" $lease $shard }}
{{- else }}
{{- $lease }}
{{- end }}
{{- end }}

{{/* Every Lease of the operator's Deployments, as a JSON list: one, or one per shard. */}}
{{- define "datamesh.operator.leaseNames" -}}
{{- $names := list }}
{{- range (.Values.operator.shards | default (list dict)) }}
{{- $names = append $names (include "datamesh.operator.leaseName" (dict "ctx" $ "shard" (get . "name"))) }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/*
Namespaces whose products the operator's Roles cover, as a JSON list (empty: all, a ClusterRole):
operator.watchNamespaces, or with namespace shards the namespaces of every shard.
*/}}
{{- define "datamesh.operator.productNamespaces" -}}
{{- $namespaces := .Values.operator.watchNamespaces }}
{{- range .Values.operator.shards }}
{{- $namespaces = concat $namespaces (get . "namespaces" | default list) }}
{{- end }}
{{- toJson ($namespaces | uniq) }}
{{- end }}

{{/* Operator replicas rendered: the embedded store is locked to one process, so at most one there. */}}
{{- define "datamesh.operator.replicas" -}}
{{- if include "datamesh.embedded" . }}{{ min 1 (int .Values.operator.replicas) }}{{ else }}{{ int .Values.operator.replicas }}{{ end }}
{{- end }}

{{- define "datamesh.query.fullname" -}}
{{- printf "%s-query" (include "datamesh.fullname" .) }}
{{- end }}

{{- define "datamesh.qdrant.fullname" -}}
{{- printf "%s-qdrant" (include "datamesh.fullname" .) }}
{{- end }}

{{- define "datamesh.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "datamesh.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "datamesh.query.serviceAccountName" -}}
{{- if .Values.queryService.serviceAccount.create }}
{{- default (include "datamesh.query.fullname" .) .Values.queryService.serviceAccount.name }}
{{- else }}
{{- required "queryService.serviceAccount.name is required when queryService.serviceAccount.create is false" .Values.queryService.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret with the query service's tokens file, or "" when there is none. */}}
{{- define "datamesh.query.tokensSecret" -}}
{{- if .Values.queryService.auth.existingSecret }}
{{- .Values.queryService.auth.existingSecret }}
{{- else if .Values.queryService.auth.tokens }}
{{- printf "%s-tokens" (include "datamesh.query.fullname" .) }}
{{- end }}
{{- end }}

{{/* The Qdrant REST URL the operator and the query service use. */}}
{{- define "datamesh.qdrant.url" -}}
{{- if eq .Values.qdrant.mode "external" }}
{{- required "qdrant.external.url is required when qdrant.mode is external" .Values.qdrant.external.url }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "datamesh.qdrant.fullname" .) .Release.Namespace (int .Values.qdrant.builtin.httpPort) }}
{{- end }}
{{- end }}

{{/*
store.mode embedded: Qdrant's engine runs inside the operator process ("true"), or "" when the
vectors live in a Qdrant server (built in or external).
*/}}
{{- define "datamesh.embedded" -}}
{{- if eq .Values.store.mode "embedded" }}true{{ end }}
{{- end }}

{{/* The built-in Qdrant StatefulSet is rendered ("true"), or "". */}}
{{- define "datamesh.qdrant.builtin" -}}
{{- if and (eq .Values.qdrant.mode "builtin") (not (include "datamesh.embedded" .)) }}true{{ end }}
{{- end }}

{{/* The query service runs as its own Deployment ("true"), or "" (disabled, or embedded). */}}
{{- define "datamesh.query.deployed" -}}
{{- if and .Values.queryService.enabled (not (include "datamesh.embedded" .)) }}true{{ end }}
{{- end }}

{{/* The operator serves the query API itself (store.mode embedded) ("true"), or "". */}}
{{- define "datamesh.query.inOperator" -}}
{{- if and .Values.queryService.enabled (include "datamesh.embedded" .) }}true{{ end }}
{{- end }}

{{/* Folder of the embedded store in the operator container. */}}
{{- define "datamesh.embedded.path" -}}
/var/lib/datamesh/store
{{- end }}

{{/* Vector store variables of the operator and the query service. */}}
{{- define "datamesh.qdrant.env" -}}
{{- if include "datamesh.embedded" . -}}
- name: DATAMESH_QDRANT_PATH
  value: {{ include "datamesh.embedded.path" . | quote }}
{{- else -}}
- name: DATAMESH_QDRANT_URL
  value: {{ include "datamesh.qdrant.url" . | quote }}
{{- if .Values.qdrant.apiKey.existingSecret }}
- name: DATAMESH_QDRANT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.qdrant.apiKey.existingSecret }}
      key: {{ .Values.qdrant.apiKey.secretKey }}
{{- end }}
{{- if include "datamesh.qdrant.ca" . }}
- name: DATAMESH_QDRANT_CA_FILE
  value: {{ printf "%s/%s" (include "datamesh.qdrant.caDir" .) .Values.qdrant.external.tls.ca.key | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The external Qdrant's CA bundle is mounted ("true"), or "". */}}
{{- define "datamesh.qdrant.ca" -}}
{{- $ca := .Values.qdrant.external.tls.ca }}
{{- if and (eq .Values.qdrant.mode "external") (not (include "datamesh.embedded" .)) (or $ca.secretName $ca.configMapName) }}true{{ end }}
{{- end }}

{{/* Folder of the external Qdrant's CA bundle in the operator and query containers. */}}
{{- define "datamesh.qdrant.caDir" -}}
/etc/datamesh/qdrant-ca
{{- end }}

{{/* The CA bundle's volumeMount (nothing without one). */}}
{{- define "datamesh.qdrant.caMount" -}}
{{- if include "datamesh.qdrant.ca" . }}
- name: qdrant-ca
  mountPath: {{ include "datamesh.qdrant.caDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The CA bundle's volume, from the Secret or the ConfigMap (nothing without one). */}}
{{- define "datamesh.qdrant.caVolume" -}}
{{- $ca := .Values.qdrant.external.tls.ca }}
{{- if include "datamesh.qdrant.ca" . }}
# The CA that signed the external Qdrant's certificate (DATAMESH_QDRANT_CA_FILE).
- name: qdrant-ca
  {{- if $ca.secretName }}
  secret:
    secretName: {{ $ca.secretName }}
    items:
      - key: {{ $ca.key }}
        path: {{ $ca.key }}
  {{- else }}
  configMap:
    name: {{ $ca.configMapName }}
    items:
      - key: {{ $ca.key }}
        path: {{ $ca.key }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Who may call the query API (DATAMESH_QUERY_* of the query service, or of the operator when it serves the API). */}}
{{- define "datamesh.query.authEnv" -}}
{{- $q := .Values.queryService -}}
- name: DATAMESH_QUERY_ALLOW_ANONYMOUS
  value: {{ $q.auth.allowAnonymous | quote }}
{{- if include "datamesh.query.tokensSecret" . }}
- name: DATAMESH_QUERY_TOKENS_FILE
  value: /etc/datamesh/tokens/{{ $q.auth.secretKey }}
{{- end }}
{{- end }}

{{/* The query API's MCP endpoint (/mcp), when mcp.enabled. */}}
{{- define "datamesh.query.mcpEnv" -}}
{{- if .Values.mcp.enabled }}
- name: DATAMESH_QUERY_MCP
  value: "true"
{{- end }}
{{- end }}

{{/* A name: value map as a list of EnvVar (values quoted: env values are strings). */}}
{{- define "datamesh.envMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* The writable scratch folder every container gets, since root filesystems are read-only. */}}
{{- define "datamesh.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end }}

{{/*
Checks of combinations the JSON schema cannot express well; each fails with the value's name.
*/}}
{{- define "datamesh.validate" -}}
{{- if and (eq .Values.qdrant.mode "external") (not .Values.qdrant.external.url) }}
{{- fail "qdrant.external.url is required when qdrant.mode is \"external\" (the URL of your Qdrant server, e.g. https://qdrant.example.com:6333)" }}
{{- end }}
{{- if le (int .Values.operator.watch.clientTimeoutSeconds) (int .Values.operator.watch.serverTimeoutSeconds) }}
{{- fail (printf "operator.watch.clientTimeoutSeconds (%v) must be greater than operator.watch.serverTimeoutSeconds (%v), or healthy watches are abandoned before the server ends them" .Values.operator.watch.clientTimeoutSeconds .Values.operator.watch.serverTimeoutSeconds) }}
{{- end }}
{{- if and .Values.queryService.autoscaling.enabled (lt (int .Values.queryService.autoscaling.maxReplicas) (int .Values.queryService.autoscaling.minReplicas)) }}
{{- fail "queryService.autoscaling.maxReplicas must be at least queryService.autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.queryService.autoscaling.enabled (not (or .Values.queryService.autoscaling.targetCPUUtilizationPercentage .Values.queryService.autoscaling.targetMemoryUtilizationPercentage)) }}
{{- fail "queryService.autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage above 0" }}
{{- end }}
{{- if and .Values.queryService.ingress.enabled (not .Values.queryService.ingress.hosts) }}
{{- fail "queryService.ingress.hosts needs at least one host when queryService.ingress.enabled is true" }}
{{- end }}
{{- if and .Values.operator.ingestJobs.enabled (include "datamesh.embedded" .) (not .Values.store.embedded.existingClaim) }}
{{- fail "operator.ingestJobs.enabled with store.mode embedded needs store.embedded.existingClaim: the ingestion Jobs write into the store's volume, which an emptyDir cannot share" }}
{{- end }}
{{- if and .Values.operator.ingestJobs.enabled .Values.operator.shards }}
{{- fail "operator.ingestJobs.enabled is not supported with operator.shards yet: the Jobs of every shard would share one platform namespace and its Job watch" }}
{{- end }}
{{- if and .Values.mcp.enabled (not .Values.queryService.enabled) }}
{{- fail "mcp.enabled needs queryService.enabled: the query service serves the MCP tools at /mcp" }}
{{- end }}
{{- if and .Values.queryService.ingress.enabled (not .Values.queryService.enabled) }}
{{- fail "queryService.ingress.enabled needs queryService.enabled" }}
{{- end }}
{{- $le := .Values.operator.leaderElection }}
{{- if and (gt (int .Values.operator.replicas) 1) (not $le.enabled) (not (include "datamesh.embedded" .)) }}
{{- fail (printf "operator.replicas (%v) above 1 needs operator.leaderElection.enabled: without it every replica would reconcile every product" .Values.operator.replicas) }}
{{- end }}
{{- if le (float64 $le.leaseDurationSeconds) (float64 $le.renewDeadlineSeconds) }}
{{- fail (printf "operator.leaderElection.renewDeadlineSeconds (%v) must be less than leaseDurationSeconds (%v): the leader must give up before a standby may take over" $le.renewDeadlineSeconds $le.leaseDurationSeconds) }}
{{- end }}
{{- if lt (float64 $le.renewDeadlineSeconds) (mulf 2 $le.retryPeriodSeconds) }}
{{- fail (printf "operator.leaderElection.retryPeriodSeconds (%v) must be at most half of renewDeadlineSeconds (%v), so the leader gets a second try at renewing" $le.retryPeriodSeconds $le.renewDeadlineSeconds) }}
{{- end }}
{{- if and (include "datamesh.embedded" .) .Values.queryService.autoscaling.enabled }}
{{- fail "queryService.autoscaling.enabled cannot be used with store.mode \"embedded\": the query API is served by the single operator pod, which owns the embedded store" }}
{{- end }}
{{- include "datamesh.validateShards" . }}
{{- include "datamesh.validateQdrant" . }}
{{- end }}

{{/* operator.shards: named once each, split one way, never overlapping by namespace. */}}
{{- define "datamesh.validateShards" -}}
{{- $shards := .Values.operator.shards }}
{{- if and $shards (include "datamesh.embedded" .) }}
{{- fail "operator.shards cannot be used with store.mode \"embedded\": the embedded store is locked to one operator process, so there is nothing to shard (use store.mode \"qdrant\")" }}
{{- end }}
{{- $names := dict }}
{{- $byNamespace := dict }}
{{- $kinds := dict }}
{{- range $i, $shard := $shards }}
{{- $name := get $shard "name" }}
{{- if hasKey $names $name }}
{{- fail (printf "operator.shards: the shard name %q is used twice; each shard needs a name of its own (its Deployment, Lease and catalog entries are named after it)" $name) }}
{{- end }}
{{- $_ := set $names $name true }}
{{- $namespaces := get $shard "namespaces" | default list }}
{{- $selector := get $shard "labelSelector" }}
{{- if and $namespaces $selector }}
{{- fail (printf "operator.shards[%d] (%s) has both namespaces and labelSelector; give a shard one of them" $i $name) }}
{{- end }}
{{- if not (or $namespaces $selector) }}
{{- fail (printf "operator.shards[%d] (%s) needs namespaces or a labelSelector: which products it reconciles" $i $name) }}
{{- end }}
{{- $_ := set $kinds (ternary "namespaces" "labelSelector" (not (empty $namespaces))) true }}
{{- range $namespaces }}
{{- if hasKey $byNamespace . }}
{{- fail (printf "operator.shards: namespace %q is in shards %s and %s; a product must belong to one shard" . (get $byNamespace .) $name) }}
{{- end }}
{{- $_ := set $byNamespace . $name }}
{{- end }}
{{- end }}
{{- if gt (len $kinds) 1 }}
{{- fail "operator.shards: split every shard by namespaces or every shard by labelSelector, not both (a label shard would also take products of the namespace shards)" }}
{{- end }}
{{- if and $byNamespace .Values.operator.watchNamespaces }}
{{- fail "operator.watchNamespaces cannot be used with shards split by namespaces: list the namespaces in each shard (operator.shards[].namespaces)" }}
{{- end }}
{{- end }}

{{/* The built-in Qdrant cluster and the external Qdrant's TLS. */}}
{{- define "datamesh.validateQdrant" -}}
{{- $qd := .Values.qdrant }}
{{- if include "datamesh.qdrant.builtin" . }}
{{- if and (gt (int $qd.replicas) 1) (not $qd.cluster.enabled) }}
{{- fail (printf "qdrant.replicas (%v) above 1 needs qdrant.cluster.enabled: separate single-node Qdrants behind one Service would each hold different collections" $qd.replicas) }}
{{- end }}
{{- if and $qd.cluster.enabled (not $qd.builtin.persistence.enabled) }}
{{- fail "qdrant.cluster.enabled needs qdrant.builtin.persistence.enabled: a node restarted without its volume loses its Raft state and cannot rejoin the cluster" }}
{{- end }}
{{- end }}
{{- if and (eq $qd.mode "external") (or $qd.cluster.enabled (gt (int $qd.replicas) 1)) }}
{{- fail "qdrant.replicas and qdrant.cluster are for the built-in Qdrant (qdrant.mode \"builtin\"); an external Qdrant's cluster is configured where it runs" }}
{{- end }}
{{- $ca := $qd.external.tls.ca }}
{{- if and $ca.secretName $ca.configMapName }}
{{- fail "qdrant.external.tls.ca: set secretName or configMapName, not both" }}
{{- end }}
{{- if or $ca.secretName $ca.configMapName }}
{{- if ne $qd.mode "external" }}
{{- fail "qdrant.external.tls.ca is for qdrant.mode \"external\" (the built-in Qdrant serves plain HTTP inside the release)" }}
{{- end }}
{{- if not (hasPrefix "https://" $qd.external.url) }}
{{- fail (printf "qdrant.external.tls.ca needs an https:// qdrant.external.url (got %q): the CA verifies the server's certificate" $qd.external.url) }}
{{- end }}
{{- end }}
{{- end }}
