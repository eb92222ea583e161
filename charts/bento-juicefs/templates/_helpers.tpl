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

{{- define "bento-juicefs.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
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

{{/* config.yaml: what the values set, then .Values.config merged over it. */}}
{{- define "bento-juicefs.config" -}}
{{- $p := include "bento-juicefs.profile" . | fromYaml }}
{{- $cfg := dict "cluster" (dict "kubernetesVersion" (toString .Values.kubernetesVersion) "platformProfile" .Values.profile) }}
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
The CEL that holds a pods/status write to the conditions: every PodStatus
field of v1.37 but conditions, and the metadata that pods/status can still
change (labels, annotations, finalizers), unchanged. One source for the
bento-juicefs-models-ready-fence and bento-juicefs-node-agent-pods-fence
policies (manifests/base spells it out in both; tests/test_rbac_manifests.py
checks they agree).
*/}}
{{- define "bento-juicefs.podStatusUnchanged" -}}
object.status.?observedGeneration == oldObject.status.?observedGeneration &&
object.status.?phase == oldObject.status.?phase &&
object.status.?message == oldObject.status.?message &&
object.status.?reason == oldObject.status.?reason &&
object.status.?nominatedNodeName == oldObject.status.?nominatedNodeName &&
object.status.?hostIP == oldObject.status.?hostIP &&
object.status.?hostIPs == oldObject.status.?hostIPs &&
object.status.?podIP == oldObject.status.?podIP &&
object.status.?podIPs == oldObject.status.?podIPs &&
object.status.?startTime == oldObject.status.?startTime &&
object.status.?initContainerStatuses == oldObject.status.?initContainerStatuses &&
object.status.?containerStatuses == oldObject.status.?containerStatuses &&
object.status.?qosClass == oldObject.status.?qosClass &&
object.status.?ephemeralContainerStatuses == oldObject.status.?ephemeralContainerStatuses &&
object.status.?resize == oldObject.status.?resize &&
object.status.?resourceClaimStatuses == oldObject.status.?resourceClaimStatuses &&
object.status.?extendedResourceClaimStatus == oldObject.status.?extendedResourceClaimStatus &&
object.status.?allocatedResources == oldObject.status.?allocatedResources &&
object.status.?resources == oldObject.status.?resources &&
object.status.?nodeAllocatableResourceClaimStatuses == oldObject.status.?nodeAllocatableResourceClaimStatuses &&
object.status.?volumeHealth == oldObject.status.?volumeHealth &&
object.metadata.?labels == oldObject.metadata.?labels &&
object.metadata.?annotations == oldObject.metadata.?annotations &&
object.metadata.?finalizers == oldObject.metadata.?finalizers
{{- end }}
