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
Whether the chart creates bento-juicefs-system: namespace.create, unless the
release itself is installed there (`helm install -n bento-juicefs-system`,
with --create-namespace or not). Helm keeps the release in its namespace, so
that namespace exists before any object of the chart, and a Namespace object
of the same name would collide (--create-namespace makes a plain one, and
otherwise it is someone else's): the chart cannot own it then.
*/}}
{{- define "bento-juicefs.createsNamespace" -}}
{{- if and .Values.namespace.create (ne .Release.Namespace "bento-juicefs-system") }}true{{ end }}
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
sidecar.imagePullPolicy (IfNotPresent). imagePullSecrets' names become
sidecar.imagePullSecrets, which the injector adds to the pods it injects;
config.sidecar.imagePullSecrets wins when set.
*/}}
{{- define "bento-juicefs.config" -}}
{{- $p := include "bento-juicefs.profile" . | fromYaml }}
{{- $cfg := dict "cluster" (dict "kubernetesVersion" (toString .Values.kubernetesVersion) "platformProfile" .Values.profile) }}
{{- $sidecar := dict "image" (include "bento-juicefs.image" .) }}
{{- with (include "bento-juicefs.imagePullSecrets" . | fromJsonArray) }}
{{- $names := list }}
{{- range . }}{{ $names = append $names .name }}{{ end }}
{{- $_ := set $sidecar "imagePullSecrets" $names }}
{{- end }}
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
The injector's defaults (injector/config.py) for the config keys that other
objects follow: the webhook's and the sidecar-required policy's selectors,
the sidecar PodMonitor's, the injector's port (Deployment, NetworkPolicy)
and the bound the webhook's timeout must exceed. tests/test_chart.py renders
the chart with these changed and checks every object against the config
the injector parses.
*/}}
{{- define "bento-juicefs.injectorDefaults" -}}
labels:
  namespaceOptIn: juicefs.bentoml.com/injection
  namespaceOptInValue: enabled
  modelStore: juicefs.bentoml.com/model-store
  modelStoreValue: juicefs
  inject: juicefs.bentoml.com/inject
webhook:
  excludedNamespaces: [kube-system, kube-public, kube-node-lease]
server:
  port: 9443
  reviewQueueSeconds: 1
{{- end }}

{{/*
Config keys whose value the chart's objects name as they are (object names,
and what the admission policies' CEL and the sidecar PodMonitor spell): the
config may repeat the value, not change it.
*/}}
{{- define "bento-juicefs.fixedConfig" -}}
webhook:
  name: inject.juicefs.bentoml.com
  configurationName: bento-juicefs-injector
  namespace: bento-juicefs-system
  serviceName: bento-juicefs-injector
  caSecretName: bento-juicefs-injector-ca
sidecar:
  containerName: juicefs-mount
volumes:
  mountDirName: juicefs-mount-dir
  cacheName: juicefs-cache
  agentName: juicefs-agent
readiness:
  conditionType: juicefs.bentoml.com/models-ready
{{- end }}

{{/*
The keys of injectorDefaults as the injector will read them: the rendered
config.yaml's value where it sets one (an empty one too), else the default.
A key the chart reads must be written camelCase: the injector also takes
snake_case, which the chart would miss, so that is refused here, as are a
changed fixedConfig key and a key that became a chart value.
*/}}
{{- define "bento-juicefs.effective" -}}
{{- $cfg := include "bento-juicefs.config" . | fromYaml }}
{{- $webhook := $cfg.webhook | default dict }}
{{- if and (kindIs "map" $webhook) (or (hasKey $webhook "timeoutSeconds") (hasKey $webhook "timeout_seconds")) }}
{{- fail "config.webhook.timeoutSeconds was removed: set the chart value webhook.timeoutSeconds, which the MutatingWebhookConfiguration gets" }}
{{- end }}
{{- range $section, $keys := (include "bento-juicefs.fixedConfig" . | fromYaml) }}
{{- $given := get $cfg $section | default dict }}
{{- if kindIs "map" $given }}
{{- range $key, $fixed := $keys }}
{{- range $spelling := list $key (snakecase $key) | uniq }}
{{- if and (hasKey $given $spelling) (ne (toString (get $given $spelling)) $fixed) }}
{{- fail (printf "config.%s.%s is %q, but the chart's objects name %s: leave the key out (the chart cannot follow it)" $section $spelling (toString (get $given $spelling)) $fixed) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $out := dict }}
{{- range $section, $keys := (include "bento-juicefs.injectorDefaults" . | fromYaml) }}
{{- $given := get $cfg $section | default dict }}
{{- if not (kindIs "map" $given) }}{{ $given = dict }}{{ end }}
{{- $merged := dict }}
{{- range $key, $value := $keys }}
{{- if and (ne (snakecase $key) $key) (hasKey $given (snakecase $key)) }}
{{- fail (printf "config.%s.%s: write it %s (camelCase): the chart reads that spelling to render its other objects alike" $section (snakecase $key) $key) }}
{{- end }}
{{- $_ := set $merged $key (ternary (get $given $key) $value (hasKey $given $key)) }}
{{- end }}
{{- $_ := set $out $section $merged }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
The webhook's namespaceSelector and objectSelector, from the config's labels
(what the injector screens by: injector/plan.py) and excluded namespaces;
the sidecar-required policy selects the same pods.
*/}}
{{- define "bento-juicefs.namespaceSelector" -}}
{{- $c := include "bento-juicefs.effective" . | fromYaml -}}
matchExpressions:
  - key: {{ $c.labels.namespaceOptIn | quote }}
    operator: In
    values: [{{ $c.labels.namespaceOptInValue | quote }}]
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values: {{ append $c.webhook.excludedNamespaces "bento-juicefs-system" | uniq | toJson }}
{{- end }}

{{- define "bento-juicefs.objectSelector" -}}
{{- $c := include "bento-juicefs.effective" . | fromYaml -}}
matchExpressions:
  - key: {{ $c.labels.modelStore | quote }}
    operator: In
    values: [{{ $c.labels.modelStoreValue | quote }}]
  - key: {{ $c.labels.inject | quote }}
    operator: NotIn
    values: ["false"]
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

{{/*
A pod template's labels or annotations: the chart's own (what the
selectors, the Service and the monitors match; checksum/config) and the
podLabels or podAnnotations value beside them. A value may add keys, not
change the chart's: that would orphan the pods from their controller, or
stop a config change from rolling them.
(dict "own" <map> "extra" <map> "value" "injector.podLabels")
*/}}
{{- define "bento-juicefs.podMetadata" -}}
{{- range $key, $value := .extra }}
{{- if hasKey $.own $key }}
{{- fail (printf "%s: %s is the chart's own; leave it out" $.value $key) }}
{{- end }}
{{- end }}
{{- toYaml (merge (dict) .own .extra) }}
{{- end }}

{{/*
A container's env: the chart's own variables, then an extraEnv value, which
may add variables but not set one of the chart's again.
(dict "own" <list> "extra" <list> "value" "nodeAgent.extraEnv")
*/}}
{{- define "bento-juicefs.env" -}}
{{- $names := list }}
{{- range .own }}{{ $names = append $names .name }}{{ end }}
{{- range .extra }}
{{- if has .name $names }}
{{- fail (printf "%s: %s is set by the chart; leave it out" $.value .name) }}
{{- end }}
{{- end }}
{{- toYaml (concat .own .extra) }}
{{- end }}

{{/*
imagePullSecrets: [{name: ...}] for the injector's and the node agent's pods,
and their names for the config's sidecar.imagePullSecrets. image.pullSecrets
was its name before: refused, saying so.
*/}}
{{- define "bento-juicefs.imagePullSecrets" -}}
{{- if hasKey .Values.image "pullSecrets" }}
{{- fail "image.pullSecrets was renamed: set imagePullSecrets (the same list, [{name: ...}]), which the injected sidecars get too" }}
{{- end }}
{{- toJson .Values.imagePullSecrets }}
{{- end }}
