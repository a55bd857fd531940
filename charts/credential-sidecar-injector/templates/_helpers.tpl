{{/*
Chart name, shortened to the 63 characters a label value allows.
*/}}
{{- define "injector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of every object of a release: the release name, with the chart name
appended unless the release name already contains it; 63 characters at most.
*/}}
{{- define "injector.fullname" -}}
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

{{/*
Labels that select the webhook's pods; never change between upgrades.
*/}}
{{- define "injector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "injector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels on every object: the selector labels plus chart, version and manager.
*/}}
{{- define "injector.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "injector.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
An image reference from a {repository, tag} map; the tag defaults to appVersion.
Called with a list: (list image-values root-context).
*/}}
{{- define "injector.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/*
The DNS name the API server calls: the Service in the release namespace. The
certificate must name it.
*/}}
{{- define "injector.serviceHost" -}}
{{- printf "%s.%s.svc" (include "injector.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
Name of the kubernetes.io/tls Secret holding the serving certificate.
*/}}
{{- define "injector.tlsSecret" -}}
{{- printf "%s-tls" (include "injector.fullname" .) }}
{{- end }}

{{/*
"true" when cert-manager issues the certificate: tls.source cert-manager, or
auto with the cert-manager.io/v1 API present in the cluster; else empty.
*/}}
{{- define "injector.certManager" -}}
{{- if or (eq .Values.tls.source "cert-manager") (and (eq .Values.tls.source "auto") (.Capabilities.APIVersions.Has "cert-manager.io/v1")) }}true{{ end }}
{{- end }}

{{/*
Fixed paths inside the webhook's pod.
*/}}
{{- define "injector.configDir" -}}/etc/credential-sidecar-injector/config{{- end }}
{{- define "injector.tlsDir" -}}/etc/credential-sidecar-injector/tls{{- end }}

{{/*
The webhook's config file (docs/configuration.md, "The webhook's config file").
*/}}
{{- define "injector.configFile" -}}
listen: {{ printf "0.0.0.0:%d" (int .Values.port) | quote }}
tls_cert: {{ include "injector.tlsDir" . }}/tls.crt
tls_key: {{ include "injector.tlsDir" . }}/tls.key
image: {{ include "injector.image" (list .Values.sidecar.image .) | quote }}
image_pull_policy: {{ .Values.sidecar.image.pullPolicy }}
default_config_map: {{ if .Values.sidecar.defaultConfigMap }}{{ .Values.sidecar.defaultConfigMap | quote }}{{ else }}null{{ end }}
shutdown_grace_seconds: {{ .Values.shutdownGraceSeconds }}
resources:
  {{- toYaml .Values.sidecar.resources | nindent 2 }}
{{- end }}

{{/*
The self-signed CA and serving certificate, generated once: an existing Secret of
the release is reused (lookup), so an upgrade keeps the certificate the API
server trusts. Returns a dict with ca, crt and key (PEM), as YAML.
*/}}
{{- define "injector.selfSigned" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "injector.tlsSecret" .) }}
{{- if and $existing (index ($existing.data | default dict) "ca.crt") }}
ca: {{ index $existing.data "ca.crt" | b64dec | quote }}
crt: {{ index $existing.data "tls.crt" | b64dec | quote }}
key: {{ index $existing.data "tls.key" | b64dec | quote }}
{{- else }}
{{- $host := include "injector.serviceHost" . }}
{{- $ca := genCA (printf "%s-ca" (include "injector.fullname" .)) (int .Values.tls.selfSignedDays) }}
{{- $cert := genSignedCert $host nil (list $host (printf "%s.cluster.local" $host) (include "injector.fullname" .)) (int .Values.tls.selfSignedDays) $ca }}
ca: {{ $ca.Cert | quote }}
crt: {{ $cert.Cert | quote }}
key: {{ $cert.Key | quote }}
{{- end }}
{{- end }}
