{{/* Names and labels, as `helm create` makes them. */}}

{{- define "meshserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshserve.fullname" -}}
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

{{- define "meshserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The name of one component's objects: <fullname>-<component> (at most 63 characters). */}}
{{- define "meshserve.componentName" -}}
{{- printf "%s-%s" (include "meshserve.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "meshserve.labels" -}}
helm.sh/chart: {{ include "meshserve.chart" .root }}
{{ include "meshserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: meshserve
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "meshserve.routerServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshserve.componentName" (dict "root" . "component" "router")) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "meshserve.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "meshserve.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* The Secret with a component's TLS files (tls.crt, tls.key, ca.crt): (dict "root" $ "component" "router"). */}}
{{- define "meshserve.tlsSecretName" -}}
{{- $tls := .root.Values.tls }}
{{- if eq $tls.source "secrets" }}
{{- index $tls.existingSecrets .component }}
{{- else }}
{{- printf "%s-tls" (include "meshserve.componentName" .) }}
{{- end }}
{{- end }}

{{/* The metrics port is open for scrapers (metrics.enabled) and, with TLS, for the probes' /healthz. */}}
{{- define "meshserve.metricsPortOpen" -}}
{{- if or .Values.metrics.enabled .Values.tls.enabled }}true{{ end }}
{{- end }}

{{/* A component's image: (dict "root" $ "image" "services"), "worker" (CPU) or "worker-gpu". */}}
{{- define "meshserve.image" -}}
{{- $v := .root.Values }}
{{- $image := get (dict "services" $v.image "worker" $v.worker.image "worker-gpu" $v.worker.gpu.image) .image }}
{{- if not $image }}
{{- fail (printf "meshserve.image: no image %q" .image) }}
{{- end }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/* Seconds the kubelet waits after the preStop hook began: the hook, the service's drain, and time to exit. */}}
{{- define "meshserve.terminationGrace" -}}
{{- add .preStopSleepSeconds .drainSeconds 10 }}
{{- end }}

{{/* The collector's port the pods export traces to (otlp tracing only): networkPolicy.egress.otlp.port, else the
     port in tracing.endpoint. Empty when nothing is exported over OTLP, or the endpoint names no port. */}}
{{- define "meshserve.otlpPort" -}}
{{- $v := .Values }}
{{- if and $v.tracing.enabled (eq $v.tracing.exporter "otlp") }}
{{- if $v.networkPolicy.egress.otlp.port }}
{{- include "meshserve.envValue" $v.networkPolicy.egress.otlp.port }}
{{- else }}
{{- regexFind "[0-9]+$" (regexFind ":[0-9]+$" (urlParse $v.tracing.endpoint).host) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Values the chart refuses even though each one alone is well typed. */}}
{{- define "meshserve.validate" -}}
{{- $v := .Values }}
{{- if and $v.tracing.enabled (eq $v.tracing.exporter "otlp") (not $v.tracing.endpoint) }}
{{- fail "tracing.endpoint: the otlp exporter needs the collector's address, e.g. http://otel-collector.observability:4317" }}
{{- end }}
{{- if and $v.networkPolicy.enabled $v.networkPolicy.egress.enabled $v.tracing.enabled (eq $v.tracing.exporter "otlp") (not (include "meshserve.otlpPort" .)) }}
{{- fail (printf "networkPolicy.egress.otlp.port: tracing.endpoint (%s) names no port, so give the collector's port for the egress NetworkPolicies" $v.tracing.endpoint) }}
{{- end }}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) }}
{{- fail "model.pvc.claimName: model.source is pvc, so name the PersistentVolumeClaim that holds the model" }}
{{- end }}
{{- if and (eq $v.model.source "hostPath") (not $v.model.hostPath.path) }}
{{- fail "model.hostPath.path: model.source is hostPath, so give the node directory that holds the model" }}
{{- end }}
{{- if and (eq $v.model.source "init") (not $v.model.init.command) }}
{{- fail "model.init.command: model.source is init, so give the command that writes the model into /models" }}
{{- end }}
{{- if and (eq $v.router.discovery "kubernetes") (not $v.rbac.create) (not $v.serviceAccount.name) }}
{{- fail "router.discovery: kubernetes discovery reads EndpointSlices; keep rbac.create true, name a serviceAccount.name that may, or use dns" }}
{{- end }}
{{- range $component := list "gateway" "router" "aggregator" "worker" }}
{{- $c := index $v $component }}
{{- if and $c.autoscaling.enabled (lt (int $c.autoscaling.maxReplicas) (int $c.autoscaling.minReplicas)) }}
{{- fail (printf "%s.autoscaling.maxReplicas (%v) must be at least minReplicas (%v)" $component $c.autoscaling.maxReplicas $c.autoscaling.minReplicas) }}
{{- end }}
{{- end }}
{{- if and $v.tls.enabled (eq $v.tls.source "secrets") }}
{{- range $component := list "gateway" "router" "aggregator" "worker" }}
{{- if not (index $v.tls.existingSecrets $component) }}
{{- fail (printf "tls.existingSecrets.%s: tls.source is secrets, so name the kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) of the %s" $component $component) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $v.worker.autoscaling.enabled (not (or $v.worker.autoscaling.waitingSequences.enabled $v.worker.autoscaling.kvCacheUsage.enabled)) }}
{{- fail "worker.autoscaling: enable waitingSequences or kvCacheUsage (workers never scale on CPU), or turn autoscaling off" }}
{{- end }}
{{- end }}
