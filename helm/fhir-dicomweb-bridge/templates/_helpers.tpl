{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bridge.fullname" -}}
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

{{- define "bridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: pass (dict "root" $ "component" "api"). */}}
{{- define "bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bridge.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "bridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "bridge.secretName" -}}
{{- default (printf "%s-secrets" (include "bridge.fullname" .)) .Values.existingSecret }}
{{- end }}

{{/* A setting's value as the bridge reads it from the environment: maps as JSON, lists comma-separated. */}}
{{- define "bridge.settingValue" -}}
{{- if kindIs "map" . }}
{{- toJson . }}
{{- else if kindIs "slice" . }}
{{- join "," . }}
{{- else if kindIs "float64" . }}
{{- /* YAML numbers arrive as float64; print integers without an exponent or a ".0" */}}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* Fails the render on settings the chart can tell are wrong before any pod starts. */}}
{{- define "bridge.checks" -}}
{{- if not .Values.existingSecret }}
{{- range $required := list "dicomweb_url" "fhir_url" }}
{{- if not (or (index $.Values.config $required) (index $.Values.secretConfig $required)) }}
{{- fail (printf "BRIDGE_%s is required: set config.%s (or provide it in existingSecret)" (upper $required) $required) }}
{{- end }}
{{- end }}
{{- end }}
{{- $stateUrl := toString (coalesce (index .Values.secretConfig "state_url") (index .Values.config "state_url") "sqlite:") }}
{{- /* With existingSecret the state_url may be there: the chart cannot tell, and checks nothing. */}}
{{- $sqlite := and (hasPrefix "sqlite" $stateUrl) (or (not .Values.existingSecret) (index .Values.secretConfig "state_url")) }}
{{- $apiPods := ternary (int .Values.api.replicas) (ternary (int .Values.api.replicas) 0 .Values.api.enabled) (eq .Values.mode "combined") }}
{{- $login := or (index .Values.config "oidc_issuer") (index .Values.config "smart_launch_issuers") (index .Values.secretConfig "oidc_issuer") (index .Values.secretConfig "smart_launch_issuers") }}
{{- if and $login $sqlite (gt $apiPods 1) }}
{{- fail "browser login (config.oidc_issuer, config.smart_launch_issuers) keeps its sessions in the state store, which every API pod must share, and a SQLite state_url is one per pod: set secretConfig.state_url to a PostgreSQL URL (postgresql+psycopg://...), or api.replicas=1" }}
{{- end }}
{{- if and (eq .Values.mode "split") .Values.api.enabled .Values.worker.enabled $sqlite }}
{{- fail "mode split runs the API and the worker in separate pods, and a SQLite state_url gives each pod its own store: the API's /failures, operator page and browser sessions would not see the worker's. Set secretConfig.state_url to a PostgreSQL URL (postgresql+psycopg://...), or mode=combined with api.replicas=1" }}
{{- end }}
{{- if and (eq .Values.mode "split") .Values.worker.enabled (not .Values.worker.metricsPort) (eq (toString (dig "httpGet" "port" "" (.Values.worker.livenessProbe | default dict))) "metrics") }}
{{- fail "worker.livenessProbe asks the worker's metrics port, and worker.metricsPort is unset: set worker.metricsPort (BRIDGE_METRICS_PORT), or worker.livenessProbe={}" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- fail "ingress.enabled needs ingress.hosts (each a host and its paths)" }}
{{- end }}
{{- if and (eq .Values.mode "split") .Values.worker.enabled (gt (int .Values.worker.replicas) 1) (hasPrefix "sqlite" $stateUrl) }}
{{- fail "worker.replicas > 1 needs a PostgreSQL state_url (postgresql+psycopg://...): SQLite cannot be shared between pods" }}
{{- end }}
{{- if and (eq .Values.mode "combined") (gt (int .Values.api.replicas) 1) (hasPrefix "sqlite" $stateUrl) }}
{{- fail "mode combined with api.replicas > 1 needs a PostgreSQL state_url: each pod runs a worker" }}
{{- end }}
{{- /* The API listens on all of the pod's addresses: it must authenticate callers, or be told not to. */}}
{{- $serves := or (eq .Values.mode "combined") .Values.api.enabled }}
{{- $auth := or (index .Values.secretConfig "api_keys") (index .Values.config "jwt_jwks_url") (index .Values.config "jwt_public_key") (index .Values.secretConfig "jwt_jwks_url") (index .Values.secretConfig "jwt_public_key") (index .Values.config "oidc_issuer") (index .Values.config "smart_launch_issuers") }}
{{- $anonymous := or (index .Values.config "api_allow_anonymous") (index .Values.secretConfig "api_allow_anonymous") }}
{{- if and $serves .Values.front.enabled (not (index .Values.secretConfig "gateway_front_secret")) (not .Values.existingSecret) }}
{{- fail "front.enabled needs secretConfig.gateway_front_secret (32+ characters, BRIDGE_GATEWAY_FRONT_SECRET), or that key in existingSecret" }}
{{- end }}
{{- if and $serves (not $auth) (not $anonymous) (not .Values.existingSecret) }}
{{- fail "the API would serve patient data without authentication: set secretConfig.api_keys, config.jwt_jwks_url, config.jwt_public_key or a browser login (config.oidc_issuer, config.smart_launch_issuers), or config.api_allow_anonymous=true (BRIDGE_API_ALLOW_ANONYMOUS) if something in front authenticates callers" }}
{{- end }}
{{- end }}
