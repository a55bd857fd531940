{{/*
Chart name, shortened to the 63 characters a label value allows.
*/}}
{{- define "credential-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name for every object of a release: the release name, with the chart name
appended unless the release name already contains it. 63 characters at most
because some Kubernetes name fields are DNS labels.
*/}}
{{- define "credential-sidecar.fullname" -}}
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
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "credential-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that identify the pods of a release; used by selectors, so they must
never change between upgrades.
*/}}
{{- define "credential-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "credential-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels on every object: the selector labels plus version and manager.
*/}}
{{- define "credential-sidecar.labels" -}}
helm.sh/chart: {{ include "credential-sidecar.chart" . }}
{{ include "credential-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Name of the ServiceAccount the pod runs as.
*/}}
{{- define "credential-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "credential-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Sidecar image reference; the tag defaults to the chart's appVersion so chart
and image versions move together.
*/}}
{{- define "credential-sidecar.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) }}
{{- end }}

{{/*
Fixed paths inside the pod. One place, because the rendered config, the volume
mounts and the app's environment must agree on them.
*/}}
{{- define "credential-sidecar.configDir" -}}/etc/credential-sidecar/config{{- end }}
{{- define "credential-sidecar.configPath" -}}{{ include "credential-sidecar.configDir" . }}/config.yaml{{- end }}
{{- define "credential-sidecar.keysDir" -}}/etc/credential-sidecar/secrets{{- end }}
{{- define "credential-sidecar.vaultTokenDir" -}}/var/run/secrets/credential-sidecar/vault{{- end }}

{{/*
true (as "true", or empty) when the chart projects a service-account token for the
Vault login: backend vault, method kubernetes (also when none is named: the sidecar's
default) or jwt, and no jwt_file of the user's.
*/}}
{{- define "credential-sidecar.vaultProjectedToken" -}}
{{- $s := .Values.sidecar.config.secrets }}
{{- $auth := (($s.vault | default dict).auth | default dict) }}
{{- if and (not .Values.sidecar.rawConfig) (eq $s.backend "vault") (has ($auth.method | default "kubernetes") (list "kubernetes" "jwt")) (not $auth.jwt_file) }}true{{ end }}
{{- end }}
{{- define "credential-sidecar.mitmSecretDir" -}}/etc/credential-sidecar/mitm-ca{{- end }}
{{- define "credential-sidecar.sharedCADir" -}}/var/run/credential-sidecar/ca{{- end }}
{{- define "credential-sidecar.sharedCAPath" -}}{{ include "credential-sidecar.sharedCADir" . }}/ca.crt{{- end }}

{{/*
"host:port" for a listener, with brackets around an IPv6 host.
Called with a list: (list host port).
*/}}
{{- define "credential-sidecar.hostPort" -}}
{{- $host := index . 0 }}
{{- $port := index . 1 | int }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host $port }}
{{- else }}
{{- printf "%s:%d" $host $port }}
{{- end }}
{{- end }}

{{/*
true when TLS interception is on (as the string "true", or empty).
*/}}
{{- define "credential-sidecar.mitmEnabled" -}}
{{- $fp := .Values.sidecar.config.forward_proxy | default dict }}
{{- $mitm := $fp.mitm | default dict }}
{{- if and $fp.enabled $mitm.enabled }}true{{ end }}
{{- end }}

{{/*
Refuses value combinations that would render a pod which cannot work. Included
by the ConfigMap so a bad combination fails `helm install` and `helm template`
with a message that names the values to change.
*/}}
{{- define "credential-sidecar.validate" -}}
{{- $c := .Values.sidecar.config }}
{{- $fp := $c.forward_proxy | default dict }}
{{- $mitm := $fp.mitm | default dict }}
{{- if not .Values.sidecar.rawConfig }}
{{- if and (eq $c.secrets.backend "file") $c.upstreams (not .Values.sidecar.secretsFile.existingSecret) }}
{{- fail "sidecar.secretsFile.existingSecret: name the Secret holding the keys file (secrets.backend is file and upstreams are configured)" }}
{{- end }}
{{- if eq $c.secrets.backend "vault" }}
{{- $vault := $c.secrets.vault | default dict }}
{{- $auth := $vault.auth | default dict }}
{{- if not $vault.address }}
{{- fail "sidecar.config.secrets.vault.address: Vault's address is required with secrets.backend vault" }}
{{- end }}
{{- /* no method: the sidecar's default, kubernetes */}}
{{- $method := $auth.method | default "kubernetes" }}
{{- if and (has $method (list "kubernetes" "jwt")) (not $auth.role) }}
{{- fail (printf "sidecar.config.secrets.vault.auth.role: the Vault role to log in as is required with method %s" $method) }}
{{- end }}
{{- end }}
{{- /* identity.jwt as a list: what the schema cannot say, the sidecar refuses at start */}}
{{- $jwt := ($c.identity | default dict).jwt }}
{{- if kindIs "slice" $jwt }}
{{- $seen := dict }}
{{- $headers := dict }}
{{- range $i, $entry := $jwt }}
{{- if hasKey $seen $entry.issuer }}
{{- fail (printf "sidecar.config.identity.jwt[%d].issuer: the same issuer as identity.jwt[%v]: a token's iss picks exactly one entry, so merge the two" $i (get $seen $entry.issuer)) }}
{{- end }}
{{- $_ := set $seen $entry.issuer $i }}
{{- $_ := set $headers ($entry.header | default "Authorization" | lower) true }}
{{- end }}
{{- if gt (len $headers) 1 }}
{{- fail "sidecar.config.identity.jwt: every issuer entry must read the token from the same header (the token is read before its issuer is known)" }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.app.useForwardProxy (not $fp.enabled) }}
{{- fail "app.useForwardProxy needs sidecar.config.forward_proxy.enabled: true" }}
{{- end }}
{{- if and $mitm.enabled (not $fp.enabled) }}
{{- fail "sidecar.config.forward_proxy.mitm.enabled needs sidecar.config.forward_proxy.enabled: true" }}
{{- end }}
{{- if and $fp.passthrough_hosts (not $fp.enabled) }}
{{- fail "sidecar.config.forward_proxy.passthrough_hosts needs sidecar.config.forward_proxy.enabled: true" }}
{{- end }}
{{- end }}

{{/*
The sidecar's config file, built from sidecar.config. The chart owns the
listeners and every path inside the pod; the rest is copied key by key so the
file uses exactly the sidecar's own key names, and null values are left out
(the sidecar then applies its defaults).
*/}}
{{- define "credential-sidecar.configFile" -}}
{{- if .Values.sidecar.rawConfig }}
{{- .Values.sidecar.rawConfig }}
{{- else }}
{{- $c := .Values.sidecar.config }}
{{- $cfg := dict }}
{{- /* Data plane stays on loopback; admin binds all addresses for the kubelet's probes. */}}
{{- $_ := set $cfg "listen" (include "credential-sidecar.hostPort" (list .Values.sidecar.listenHost .Values.sidecar.ports.proxy)) }}
{{- $_ := set $cfg "admin_listen" (include "credential-sidecar.hostPort" (list "0.0.0.0" .Values.sidecar.ports.admin)) }}
{{- range $key := list "shutdown_grace_seconds" "workers" "log" "tracing" }}
{{- if not (kindIs "invalid" (get $c $key)) }}
{{- $_ := set $cfg $key (get $c $key) }}
{{- end }}
{{- end }}
{{- /* identity: header mode, or verified JWT when identity.jwt is set */}}
{{- $identity := dict }}
{{- range $key, $value := ($c.identity | default dict) }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $identity $key $value }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "identity" $identity }}
{{- /* secrets: only the chosen backend's block; the keys file path is the Secret mount */}}
{{- $s := $c.secrets }}
{{- $secrets := dict "backend" $s.backend }}
{{- if not (kindIs "invalid" $s.lookup_timeout_seconds) }}
{{- $_ := set $secrets "lookup_timeout_seconds" $s.lookup_timeout_seconds }}
{{- end }}
{{- if and (eq $s.backend "file") .Values.sidecar.secretsFile.existingSecret }}
{{- $_ := set $secrets "file" (dict "path" (printf "%s/%s" (include "credential-sidecar.keysDir" .) .Values.sidecar.secretsFile.key)) }}
{{- end }}
{{- if eq $s.backend "aws" }}
{{- $aws := dict }}
{{- range $key, $value := ($s.aws | default dict) }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $aws $key $value }}
{{- end }}
{{- end }}
{{- $_ := set $secrets "aws" $aws }}
{{- end }}
{{- if eq $s.backend "vault" }}
{{- $vault := dict }}
{{- range $key, $value := ($s.vault | default dict) }}
{{- if and (ne $key "auth") (not (kindIs "invalid" $value)) }}
{{- $_ := set $vault $key $value }}
{{- end }}
{{- end }}
{{- $auth := dict }}
{{- range $key, $value := (($s.vault | default dict).auth | default dict) }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $auth $key $value }}
{{- end }}
{{- end }}
{{- if include "credential-sidecar.vaultProjectedToken" . }}
{{- $_ := set $auth "jwt_file" (printf "%s/token" (include "credential-sidecar.vaultTokenDir" .)) }}
{{- end }}
{{- $_ := set $vault "auth" $auth }}
{{- $_ := set $secrets "vault" $vault }}
{{- end }}
{{- if $s.cache }}
{{- $_ := set $secrets "cache" $s.cache }}
{{- end }}
{{- $_ := set $secrets "prefetch" ($s.prefetch | default list) }}
{{- $_ := set $cfg "secrets" $secrets }}
{{- $_ := set $cfg "upstreams" ($c.upstreams | default dict) }}
{{- /* forward proxy: the chart decides where the interception CA lives */}}
{{- $fp := $c.forward_proxy | default dict }}
{{- $mitmIn := $fp.mitm | default dict }}
{{- $mitm := dict "enabled" (include "credential-sidecar.mitmEnabled" . | eq "true") }}
{{- if $mitm.enabled }}
{{- if .Values.sidecar.mitmCA.existingSecret }}
{{- $_ := set $mitm "ca_cert" (printf "%s/tls.crt" (include "credential-sidecar.mitmSecretDir" .)) }}
{{- $_ := set $mitm "ca_key" (printf "%s/tls.key" (include "credential-sidecar.mitmSecretDir" .)) }}
{{- end }}
{{- /* Always written by the sidecar: the CA plus the public roots, so the app's
       SSL_CERT_FILE still verifies passthrough hosts. */}}
{{- $_ := set $mitm "ca_cert_out" (include "credential-sidecar.sharedCAPath" .) }}
{{- end }}
{{- $_ := set $cfg "forward_proxy" (dict "enabled" (ne $fp.enabled false) "passthrough_hosts" ($fp.passthrough_hosts | default list) "passthrough_allow_private" ($fp.passthrough_allow_private | default false) "mitm" $mitm) }}
{{- toYaml $cfg }}
{{- end }}
{{- end }}

{{/*
The sidecar container. Rendered into initContainers (native sidecar, with
restartPolicy: Always) or into containers (classic), so it lives in one place.
*/}}
{{- define "credential-sidecar.sidecarContainer" -}}
- name: credential-sidecar
  image: {{ include "credential-sidecar.sidecarImage" . | quote }}
  imagePullPolicy: {{ .Values.sidecar.image.pullPolicy }}
  {{- if .Values.sidecar.native }}
  # A restartable init container: started before the app, stopped after it.
  restartPolicy: Always
  {{- end }}
  command: ["credential-sidecar", "run"]
  args: ["--config", {{ include "credential-sidecar.configPath" . | quote }}]
  ports:
    # Bound to {{ .Values.sidecar.listenHost }}: reachable only from inside the pod.
    - name: proxy
      containerPort: {{ .Values.sidecar.ports.proxy }}
      protocol: TCP
    - name: admin
      containerPort: {{ .Values.sidecar.ports.admin }}
      protocol: TCP
  {{- with .Values.sidecar.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: admin
    {{- toYaml .Values.sidecar.startupProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: admin
    {{- toYaml .Values.sidecar.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: admin
    {{- toYaml .Values.sidecar.readinessProbe | nindent 4 }}
  {{- with .Values.sidecar.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    - name: sidecar-config
      mountPath: {{ include "credential-sidecar.configDir" . }}
      readOnly: true
    - name: sidecar-tmp
      mountPath: /tmp
    {{- if .Values.sidecar.secretsFile.existingSecret }}
    # A directory mount (no subPath) so a rotated Secret reaches the file
    # backend, which rereads the file when it changes.
    - name: sidecar-keys
      mountPath: {{ include "credential-sidecar.keysDir" . }}
      readOnly: true
    {{- end }}
    {{- if include "credential-sidecar.vaultProjectedToken" . }}
    # The service-account token the sidecar logs in to Vault with; the app has none.
    - name: vault-token
      mountPath: {{ include "credential-sidecar.vaultTokenDir" . }}
      readOnly: true
    {{- end }}
    {{- if include "credential-sidecar.mitmEnabled" . }}
    {{- if .Values.sidecar.mitmCA.existingSecret }}
    - name: mitm-ca-secret
      mountPath: {{ include "credential-sidecar.mitmSecretDir" . }}
      readOnly: true
    {{- end }}
    - name: mitm-ca
      mountPath: {{ include "credential-sidecar.sharedCADir" . }}
    {{- end }}
    {{- with .Values.sidecar.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
Environment the app container gets from the chart: proxy settings in
forward-proxy mode and the interception CA when MITM is on. Python's ssl
module reads SSL_CERT_FILE; requests reads REQUESTS_CA_BUNDLE.
*/}}
{{- define "credential-sidecar.appProxyEnv" -}}
{{- if .Values.app.useForwardProxy }}
{{- $proxy := printf "http://%s" (include "credential-sidecar.hostPort" (list .Values.sidecar.listenHost .Values.sidecar.ports.proxy)) }}
{{- $noProxy := concat (list "localhost" "127.0.0.1" "::1") (.Values.app.noProxy | default list) | join "," }}
{{- range $name := list "HTTP_PROXY" "http_proxy" "HTTPS_PROXY" "https_proxy" }}
- name: {{ $name }}
  value: {{ $proxy | quote }}
{{- end }}
{{- range $name := list "NO_PROXY" "no_proxy" }}
- name: {{ $name }}
  value: {{ $noProxy | quote }}
{{- end }}
{{- end }}
{{- if include "credential-sidecar.mitmEnabled" . }}
{{- range $name := list "SSL_CERT_FILE" "REQUESTS_CA_BUNDLE" }}
- name: {{ $name }}
  value: {{ include "credential-sidecar.sharedCAPath" $ | quote }}
{{- end }}
{{- end }}
{{- end }}
