{{/*
Helm's standard labels, on every object's metadata (never on selectors or pod
templates, so an upgrade never changes what a Deployment selects).
tests/test_chart.py ignores exactly these four when it compares with kustomize.
*/}}
{{- define "bento-juicefs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/*
The one image of the injector, the node agent and the injected sidecars:
repository:tag (tag empty: the chart's appVersion), or repository@digest
when image.digest is set (the digest wins over the tag, as in cert-manager's
chart).
*/}}
{{- define "bento-juicefs.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The profiles' local-SSD node label and node cache directory: the chart's copy
of injector/config.py's defaults (aks has no standard label there, so the
chart names one and writes it into the config's scheduling.ssdNodeLabel).
*/}}
{{- define "bento-juicefs.profiles" -}}
gke:
  ssdNodeLabel: {key: cloud.google.com/gke-ephemeral-storage-local-ssd, value: "true"}
  nodeCachePath: /mnt/stateful_partition/kube-ephemeral-ssd/bento-juicefs
eks:
  ssdNodeLabel: {key: karpenter.k8s.aws/instance-local-nvme, value: null}
  nodeCachePath: /mnt/k8s-disks/0/bento-juicefs
aks:
  ssdNodeLabel: {key: juicefs.bentoml.com/local-ssd, value: "true"}
  chartLabel: true
  nodeCachePath: /mnt/bento-juicefs
{{- end }}

{{- define "bento-juicefs.profile" -}}
{{- $all := include "bento-juicefs.profiles" . | fromYaml }}
{{- if not (hasKey $all .Values.profile) }}
{{- fail (printf "profile %q is not one of gke, eks, aks" .Values.profile) }}
{{- end }}
{{- toYaml (get $all .Values.profile) }}
{{- end }}

{{/* The node label the node agent is placed by: ssdNodeLabel, else the profile's. */}}
{{- define "bento-juicefs.ssdNodeLabel" -}}
{{- if .Values.ssdNodeLabel }}
{{- if not .Values.ssdNodeLabel.key }}{{ fail "ssdNodeLabel needs a key" }}{{ end }}
{{- toYaml (dict "key" .Values.ssdNodeLabel.key "value" (get .Values.ssdNodeLabel "value")) }}
{{- else }}
{{- toYaml (include "bento-juicefs.profile" . | fromYaml).ssdNodeLabel }}
{{- end }}
{{- end }}

{{- define "bento-juicefs.nodeCachePath" -}}
{{- .Values.cache.nodePath | default (include "bento-juicefs.profile" . | fromYaml).nodeCachePath }}
{{- end }}

{{- define "bento-juicefs.certManager" -}}
{{- if eq .Values.certificates.mode "certManager" }}true{{ else if ne .Values.certificates.mode "selfSigned" }}
{{- fail (printf "certificates.mode %q is not selfSigned or certManager" .Values.certificates.mode) }}
{{- end }}
{{- end }}

{{/*
config.yaml: what the values set, then .Values.config merged over it. The
sidecar's image is the chart's (image.*), so `helm upgrade --set image.tag=X`
moves the sidecars injected from then on with the injector and the agent;
config.sidecar.image still wins when set. image.pullPolicy is not passed on:
the sidecar's pull is on every Bento's cold start, so it keeps the config's
sidecar.imagePullPolicy (IfNotPresent).
*/}}
{{- define "bento-juicefs.config" -}}
{{- $p := include "bento-juicefs.profile" . | fromYaml }}
{{- $cfg := dict "cluster" (dict "kubernetesVersion" (toString .Values.kubernetesVersion) "platformProfile" .Values.profile) }}
{{- $sidecar := dict "image" (include "bento-juicefs.image" .) }}
{{- $_ := set $cfg "sidecar" $sidecar }}
{{- $cache := dict }}
{{- if .Values.cache.mode }}{{ $_ := set $cache "mode" .Values.cache.mode }}{{ end }}
{{- if .Values.cache.nodePath }}{{ $_ := set $cache "nodePath" .Values.cache.nodePath }}{{ end }}
{{- if $cache }}{{ $_ := set $cfg "cache" $cache }}{{ end }}
{{- if or .Values.ssdNodeLabel $p.chartLabel }}
{{- $_ := set $cfg "scheduling" (dict "ssdNodeLabel" (include "bento-juicefs.ssdNodeLabel" . | fromYaml)) }}
{{- end }}
{{- if include "bento-juicefs.certManager" . }}
{{- $_ := set $cfg "server" (dict "selfSigned" false) }}
{{- $_ := set $cfg "webhook" (dict "manageCaBundle" false) }}
{{- end }}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy .Values.config)) }}
{{- end }}

{{/*
The credentials Secrets the namespace controller copies into opted-in
namespaces, by name: one per config.juicefs.allowedVolumes, named by
config.juicefs.secretNameTemplate (the injector's defaults when unset).
*/}}
{{- define "bento-juicefs.credentialSecrets" -}}
{{- $names := list }}
{{- range (include "bento-juicefs.volumes" . | fromJsonArray) }}
{{- $names = append $names .secret }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/*
Each JuiceFS volume of config.juicefs.allowedVolumes (the injector's default
when unset): its name, its credentials Secret (config.juicefs.
secretNameTemplate) and the node agent's volume name for that Secret
("credentials" for the first, as in manifests/base).
*/}}
{{- define "bento-juicefs.volumes" -}}
{{- $juicefs := default dict .Values.config.juicefs }}
{{- $template := default "juicefs-{volume}-credentials" $juicefs.secretNameTemplate }}
{{- $volumes := list }}
{{- range $i, $name := (default (list "models") $juicefs.allowedVolumes) }}
{{- $mount := ternary "credentials" (printf "credentials-%d" $i) (eq $i 0) }}
{{- $volumes = append $volumes (dict "name" $name "secret" (replace "{volume}" $name $template) "mount" $mount) }}
{{- end }}
{{- toJson $volumes }}
{{- end }}
