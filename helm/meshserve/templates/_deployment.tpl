{{/*
One Deployment shape for every component, so probes, security, drain and volumes are written once.
Arguments (dict):
  root       the top-level context
  component  gateway, router, aggregator or worker
  image      the container image
  ports      YAML list of extra containerPorts (besides grpc and metrics)
  env        YAML list of extra env entries
  volumes    YAML list of extra volumes;  mounts: YAML list of extra volumeMounts
  initContainers  YAML list
  resources  the container's resources (a dict)
  nodeSelector, tolerations  already merged for the component
  serviceAccountName  only the router sets one; other pods mount no API token
*/}}
{{- define "meshserve.deployment" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $c := index $v .component }}
{{- $name := include "meshserve.componentName" (dict "root" $root "component" .component) }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "meshserve.labels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  {{- if not $c.autoscaling.enabled }}
  replicas: {{ $c.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: {{ $c.strategy.maxSurge }}
      maxUnavailable: {{ $c.strategy.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "meshserve.selectorLabels" (dict "root" $root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "meshserve.labels" (dict "root" $root "component" .component) | nindent 8 }}
        {{- with $c.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include "meshserve.configData" (dict "root" $root "component" .component) | sha256sum }}
        {{- if and $v.metrics.enabled $v.metrics.podAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $c.metricsPort | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- with $c.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- if .serviceAccountName }}
      serviceAccountName: {{ .serviceAccountName }}
      automountServiceAccountToken: true
      {{- else }}
      automountServiceAccountToken: false
      {{- end }}
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ include "meshserve.terminationGrace" $c }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .initContainers }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ .image }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args: [{{ .component | quote }}]
          ports:
            - name: grpc
              containerPort: {{ $c.grpcPort }}
              protocol: TCP
            {{- if include "meshserve.metricsPortOpen" $root }}
            - name: metrics
              containerPort: {{ $c.metricsPort }}
              protocol: TCP
            {{- end }}
            {{- with .ports }}
            {{- . | nindent 12 }}
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ $name }}
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.namespace
            - name: NODE_NAME
              valueFrom:
                fieldRef:
                  fieldPath: spec.nodeName
            - name: OTEL_RESOURCE_ATTRIBUTES
              value: {{ printf "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),k8s.node.name=$(NODE_NAME)%s" (ternary (printf ",%s" $v.tracing.resourceAttributes) "" (ne $v.tracing.resourceAttributes "")) | quote }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $c.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- /* grpc.health.v1 says NOT_SERVING while loading and while draining; the kubelet stops liveness probes
               once the pod is being deleted, so a draining pod is not restarted. Without TLS: native gRPC probes.
               With TLS the gRPC port answers only the mesh's certificates (and gRPC probes speak no TLS): the
               same status as /healthz on the plaintext metrics port. */}}
          {{- $probe := printf "grpc:\n  port: %v" $c.grpcPort }}
          {{- if $v.tls.enabled }}
          {{- $probe = printf "httpGet:\n  path: /healthz\n  port: %v" $c.metricsPort }}
          {{- end }}
          startupProbe:
            {{- $probe | nindent 12 }}
            {{- toYaml $c.probes.startup | nindent 12 }}
          readinessProbe:
            {{- $probe | nindent 12 }}
            {{- toYaml $c.probes.readiness | nindent 12 }}
          livenessProbe:
            {{- $probe | nindent 12 }}
            {{- toYaml $c.probes.liveness | nindent 12 }}
          {{- if gt (int $c.preStopSleepSeconds) 0 }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $c.preStopSleepSeconds }}
          {{- end }}
          resources:
            {{- toYaml .resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: cache
              mountPath: {{ $v.cache.mountPath }}
            {{- if $v.tls.enabled }}
            {{- /* The whole Secret, not subPaths: a renewed certificate reaches the running servers. */}}
            - name: tls
              mountPath: /etc/meshserve-tls
              readOnly: true
            {{- end }}
            {{- with .mounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $v.tmpSizeLimit }}
        - name: cache
          emptyDir:
            sizeLimit: {{ $v.cache.sizeLimit }}
        {{- if $v.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ include "meshserve.tlsSecretName" (dict "root" $root "component" .component) }}
            items:
              - {key: tls.crt, path: tls.crt}
              - {key: tls.key, path: tls.key}
              - {key: ca.crt, path: ca.crt}
        {{- end }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
      {{- with .nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* An env value as the service parses it: whole numbers without an exponent (values arrive as float64). */}}
{{- define "meshserve.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* The component's ConfigMap data: MESHSERVE_* settings (one per flag of `meshserve <component>`) and OTEL_*. */}}
{{- define "meshserve.configData" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $c := index $v .component }}
{{- $full := include "meshserve.fullname" $root }}
MESHSERVE_HOST: {{ $v.listenHost | quote }}
MESHSERVE_PORT: {{ include "meshserve.envValue" $c.grpcPort | quote }}
MESHSERVE_METRICS_PORT: {{ ternary (include "meshserve.envValue" $c.metricsPort) "0" (eq (include "meshserve.metricsPortOpen" $root) "true") | quote }}
MESHSERVE_LOG_LEVEL: {{ $v.logLevel | quote }}
MESHSERVE_DRAIN_SECONDS: {{ include "meshserve.envValue" $c.drainSeconds | quote }}
MESHSERVE_TRACE: {{ ternary $v.tracing.exporter "none" $v.tracing.enabled | quote }}
MESHSERVE_CACHE: {{ $v.cache.mountPath | quote }}
{{- if $v.tls.enabled }}
MESHSERVE_TLS_CERT: /etc/meshserve-tls/tls.crt
MESHSERVE_TLS_KEY: /etc/meshserve-tls/tls.key
MESHSERVE_TLS_CA: /etc/meshserve-tls/ca.crt
{{- else }}
MESHSERVE_INSECURE: "true"
{{- end }}
{{- range $key, $value := $c.config }}
{{- /* A values file's bare `compile: off` arrives as false (YAML 1.1); the worker takes auto, on or off. */}}
{{- if and (eq $key "compile") (kindIs "bool" $value) }}
{{- $value = ternary "on" "off" $value }}
{{- end }}
{{ printf "MESHSERVE_%s" ($key | snakecase | upper) }}: {{ include "meshserve.envValue" $value | quote }}
{{- end }}
{{- if eq .component "gateway" }}
MESHSERVE_HTTP_PORT: {{ include "meshserve.envValue" $c.httpPort | quote }}
{{- /* Rate limits are per gateway process: each enforces 1/N of a tenant's (the autoscaler's floor). */}}
MESHSERVE_GATEWAY_REPLICAS: {{ ternary $c.autoscaling.minReplicas $c.replicas $c.autoscaling.enabled | quote }}
MESHSERVE_ROUTER: {{ printf "dns:///%s-router:%s" $full (include "meshserve.envValue" $v.router.grpcPort) | quote }}
MESHSERVE_AGGREGATOR: {{ printf "%s-aggregator:%s" $full (include "meshserve.envValue" $v.aggregator.grpcPort) | quote }}
{{- if $v.auth.enabled }}
MESHSERVE_API_KEYS_FILE: /etc/meshserve/api-keys.json
{{- else }}
MESHSERVE_ALLOW_UNAUTHENTICATED: "true"
{{- end }}
{{- else if eq .component "aggregator" }}
MESHSERVE_ROUTER: {{ printf "dns:///%s-router:%s" $full (include "meshserve.envValue" $v.router.grpcPort) | quote }}
{{- else if eq .component "worker" }}
{{- if ne $v.model.source "builtin" }}
MESHSERVE_MODEL: {{ trimSuffix "/" (printf "/models/%s" $v.model.path) | quote }}
{{- end }}
{{- with $v.model.name }}
MESHSERVE_MODEL_NAME: {{ . | quote }}
{{- end }}
HF_HOME: {{ printf "%s/huggingface" $v.cache.mountPath | quote }}
TRITON_CACHE_DIR: {{ printf "%s/triton" $v.cache.mountPath | quote }}
TORCHINDUCTOR_CACHE_DIR: {{ printf "%s/inductor" $v.cache.mountPath | quote }}
{{- end }}
HOME: /tmp
XDG_CACHE_HOME: {{ printf "%s/xdg" $v.cache.mountPath | quote }}
OTEL_SERVICE_NAME: {{ printf "meshserve-%s" .component | quote }}
{{- if $v.tracing.enabled }}
{{- if eq $v.tracing.exporter "otlp" }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ $v.tracing.endpoint | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ $v.tracing.protocol | quote }}
{{- end }}
OTEL_TRACES_SAMPLER: {{ $v.tracing.sampler | quote }}
OTEL_TRACES_SAMPLER_ARG: {{ $v.tracing.samplerArg | quote }}
{{- end }}
{{- end }}
