{{/*
The PrometheusRule's groups (templates/prometheus-rule.yaml adds each
alert's runbook_url and metrics.prometheusRule.alertLabels, and drops the
disabled ones). Every alert is explained, with its fix, under "Alerts" in
docs/troubleshooting.md, in an entry headed by its name.

The apiserver's metrics (apiserver_admission_webhook_*, the policy's
apiserver_validating_admission_policy_check_total) are those of the
kube-apiserver scrape most Prometheus setups have; the node agent's
absence reads kube-state-metrics. docs/metrics.md lists each upstream
metric the alerts read.
*/}}
{{- define "bento-juicefs.alertGroups" -}}
{{- $rule := .Values.metrics.prometheusRule }}
{{- $fixed := include "bento-juicefs.fixedConfig" . | fromYaml }}
{{- $webhook := $fixed.webhook.name }}
{{- $ready := $rule.timeToReady }}
groups:
  - name: bento-juicefs-injector
    rules:
      - alert: BentoJuiceFSInjectorDown
        expr: absent(up{job={{ $rule.jobs.injector | quote }}} == 1)
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: No injector replica answers Prometheus's scrape.
          description: >-
            No target of job {{ $rule.jobs.injector }} is up: the webhook cannot
            answer either, so JuiceFS Bento pods are refused (by the
            bento-juicefs-sidecar-required policy, or by the apiserver with
            failurePolicy Fail).
      - alert: BentoJuiceFSCertificateExpiring
        expr: bento_juicefs_certificate_expiry_timestamp_seconds - time() < {{ $rule.certificateExpiry.warningDays }} * 86400
        for: 1h
        labels:
          severity: warning
        annotations:
          summary: The injector's serving certificate expires in less than {{ $rule.certificateExpiry.warningDays }} days.
          description: >-
            {{`{{ $labels.pod }}`}} serves a certificate that expires in
            {{`{{ $value | humanizeDuration }}`}}; it should have been renewed by now.
      - alert: BentoJuiceFSCertificateExpiringSoon
        expr: bento_juicefs_certificate_expiry_timestamp_seconds - time() < {{ $rule.certificateExpiry.criticalDays }} * 86400
        for: 10m
        labels:
          severity: critical
        annotations:
          summary: The injector's serving certificate expires in less than {{ $rule.certificateExpiry.criticalDays }} days.
          description: >-
            {{`{{ $labels.pod }}`}} serves a certificate that expires in
            {{`{{ $value | humanizeDuration }}`}}; once it has, the apiserver cannot call the webhook.
      - alert: BentoJuiceFSWebhookErrors
        expr: |-
          sum(rate(bento_juicefs_admission_requests_total{outcome=~"error|bad_request|too_large|body_timeout"}[10m]))
            / sum(rate(bento_juicefs_admission_requests_total[10m]))
            > {{ $rule.webhookErrors.ratio }}
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: The injector answers AdmissionReviews with errors.
          description: >-
            {{`{{ $value | humanizePercentage }}`}} of the reviews over 10 minutes failed
            inside the injector or were refused as malformed: each is a pod created
            without injection (then refused by the policy) or refused outright.
      - alert: BentoJuiceFSWebhookSlow
        expr: |-
          histogram_quantile(0.99, sum by (le) (rate(bento_juicefs_admission_duration_seconds_bucket[10m])))
            > {{ $rule.webhookLatency.injectorSeconds }}
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: The injector's p99 answer time is over {{ $rule.webhookLatency.injectorSeconds }}s.
          description: >-
            The injector takes {{`{{ $value | humanizeDuration }}`}} (p99, its own
            measure) to answer an AdmissionReview.
  - name: bento-juicefs-apiserver
    rules:
      - alert: BentoJuiceFSWebhookSlowFromTheApiserver
        expr: |-
          histogram_quantile(0.99, sum by (le) (rate(apiserver_admission_webhook_admission_duration_seconds_bucket{name={{ $webhook | quote }}}[10m])))
            > {{ $rule.webhookLatency.apiserverSeconds }}
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: The apiserver waits over {{ $rule.webhookLatency.apiserverSeconds }}s (p99) for the webhook {{ $webhook }}.
          description: >-
            p99 {{`{{ $value | humanizeDuration }}`}}, network and TLS included; at
            webhook.timeoutSeconds ({{ .Values.webhook.timeoutSeconds }}s) the call fails.
      - alert: BentoJuiceFSWebhookFailOpen
        expr: sum(increase(apiserver_admission_webhook_fail_open_count{name={{ $webhook | quote }}}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: The apiserver admitted pods without calling the webhook {{ $webhook }} (failurePolicy Ignore).
          description: >-
            {{`{{ $value }}`}} calls to the webhook failed in 10 minutes and the apiserver went
            on without it: those JuiceFS Bento pods were not injected, and the
            bento-juicefs-sidecar-required policy refuses them.
      - alert: BentoJuiceFSWebhookCallsRejected
        expr: |-
          sum by (error_type) (increase(apiserver_admission_webhook_rejection_count{name={{ $webhook | quote }}, error_type!="no_error"}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: The apiserver refused requests because it could not call the webhook {{ $webhook }}.
          description: >-
            {{`{{ $value }}`}} requests in 10 minutes were refused with error_type
            {{`{{ $labels.error_type }}`}} (failurePolicy Fail, or an apiserver error).
      - alert: BentoJuiceFSWebhookDenials
        expr: |-
          sum by (operation) (increase(apiserver_admission_webhook_rejection_count{name={{ $webhook | quote }}, error_type="no_error"}[15m])) > 0
        labels:
          severity: info
        annotations:
          summary: The webhook {{ $webhook }} denied pods.
          description: >-
            {{`{{ $value }}`}} {{`{{ $labels.operation }}`}} requests in 15 minutes were
            denied by the injector: pods whose annotations or labels it refuses.
      - alert: BentoJuiceFSSidecarRequiredDenials
        expr: |-
          sum by (policy_binding) (increase(apiserver_validating_admission_policy_check_total{policy="bento-juicefs-sidecar-required", enforcement_action="deny"}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: The bento-juicefs-sidecar-required policy refused pods.
          description: >-
            {{`{{ $value }}`}} requests in 10 minutes were refused by the policy: JuiceFS
            Bento pods without the injected sidecar, usually because the webhook was
            not called or failed (see BentoJuiceFSWebhookFailOpen).
  - name: bento-juicefs-sidecars
    rules:
      - alert: BentoJuiceFSModelVerificationFailed
        expr: |-
          sum by (namespace, pod) (increase(bento_juicefs_sidecar_warmup_failures_total{reason="VerificationFailed"}[10m])) > 0
        labels:
          severity: critical
        annotations:
          summary: A pod's model bytes do not match the Bento's manifest.
          description: >-
            {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} read model bytes that differ from
            the manifest; they are never served and the pod stays NotReady.
      - alert: BentoJuiceFSWarmupFailed
        expr: |-
          sum by (namespace, pod, reason) (increase(bento_juicefs_sidecar_warmup_failures_total{reason!="VerificationFailed"}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: A pod's model warmup failed.
          description: >-
            {{`{{ $labels.namespace }}/{{ $labels.pod }}`}}: {{`{{ $labels.reason }}`}}.
      - alert: BentoJuiceFSPodNotReady
        expr: max by (namespace, pod) (bento_juicefs_sidecar_state{state=~"starting|streaming"}) == 1
        for: {{ $ready.notReadyFor }}
        labels:
          severity: warning
        annotations:
          summary: A JuiceFS Bento pod has been starting or streaming its model for {{ $ready.notReadyFor }}.
          description: >-
            {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} is not ready yet; its Events say
            where it is (kubectl describe pod).
      - alert: BentoJuiceFSTimeToReadySLO
        expr: |-
          (
            sum(last_over_time(bento_juicefs_sidecar_time_to_ready_histogram_seconds_bucket{le="{{ printf "%.1f" (float64 $ready.seconds) }}"}[{{ $ready.window }}]))
              / sum(last_over_time(bento_juicefs_sidecar_time_to_ready_histogram_seconds_count[{{ $ready.window }}]))
          ) < {{ $ready.objective }}
          and sum(last_over_time(bento_juicefs_sidecar_time_to_ready_histogram_seconds_count[{{ $ready.window }}])) >= {{ $ready.minPods }}
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: Fewer than {{ mulf $ready.objective 100 }}% of the JuiceFS Bento pods were ready within {{ $ready.seconds }}s.
          description: >-
            Of the pods that became ready and ran in the last {{ $ready.window }},
            {{`{{ $value | humanizePercentage }}`}} were ready within {{ $ready.seconds }}s
            of their sidecar's start.
{{- if .Values.nodeAgent.enabled }}
  - name: bento-juicefs-node-agents
    rules:
      - alert: BentoJuiceFSNodeCacheNearBudget
        expr: |-
          bento_juicefs_node_cache_held_bytes / (bento_juicefs_node_cache_budget_bytes > 0) > {{ $rule.nodeCache.usedRatio }}
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: A node cache holds over {{ mulf $rule.nodeCache.usedRatio 100 }}% of its budget.
          description: >-
            The node cache of {{`{{ $labels.node }}`}} holds
            {{`{{ $value | humanizePercentage }}`}} of cache.nodeBudget: the next Bento
            evicts one or does not fit.
      - alert: BentoJuiceFSNodeCacheOverBudget
        expr: bento_juicefs_node_cache_bentos{state="over-budget"} > 0
        for: 30m
        labels:
          severity: info
        annotations:
          summary: Bentos do not fit a node cache's budget.
          description: >-
            {{`{{ $value }}`}} Bentos are not warmed on {{`{{ $labels.node }}`}}: they do not fit
            cache.nodeBudget beside those in use. Their pods stream at start.
      - alert: BentoJuiceFSNodeAgentFailures
        expr: |-
          sum by (namespace, pod, node, outcome) (increase(bento_juicefs_node_agent_outcomes_total{outcome=~"WarmFailed|VerificationFailed|WarmupTimedOut|EvictFailed"}[15m])) > 0
        labels:
          severity: warning
        annotations:
          summary: A node agent's warms or evictions fail.
          description: >-
            {{`{{ $labels.pod }}`}} on {{`{{ $labels.node }}`}}: {{`{{ $value }}`}}
            {{`{{ $labels.outcome }}`}} in 15 minutes (the node's Events say why).
      - alert: BentoJuiceFSNodeAgentDown
        expr: up{job={{ $rule.jobs.nodeAgent | quote }}} == 0
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: A node agent does not answer Prometheus's scrape.
          description: >-
            {{`{{ $labels.pod }}`}} on {{`{{ $labels.node }}`}} has not been scraped for 10
            minutes: that node's cache is not kept, and unprivileged sidecars there cannot mount.
      - alert: BentoJuiceFSNodeAgentMissing
        expr: |-
          kube_daemonset_status_number_unavailable{namespace="bento-juicefs-system", daemonset="bento-juicefs-node-agent"} > 0
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: Nodes that should run the node agent do not run it (kube-state-metrics).
          description: >-
            {{`{{ $value }}`}} nodes have no available node agent: its pods are pending,
            crashing or not scheduled there.
{{- end }}
{{- end }}
