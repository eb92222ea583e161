"""The chart's PrometheusRule (metrics.prometheusRule): its shape, its queries, its runbooks.

Rendered with `helm template --set metrics.prometheusRule.enabled=true`
(the pinned Helm, as tests/test_chart.py runs it). Each alert:

- has the fields Prometheus's rule files allow, a `for` Prometheus parses,
  a severity, a summary, a description and a runbook_url;
- has an expression that parses as PromQL (promql-parser, a port of
  Prometheus's parser) and reads only metrics the code defines or the
  upstream ones docs/metrics.md lists (tests/kit/promql.py);
- links, by its runbook_url, to its own entry under "Alerts" in
  docs/troubleshooting.md (the anchor GitHub gives that heading), and is
  listed in docs/metrics.md's table of alerts.

The pinned promtool (hack/binaries/promtool, built from Prometheus's Go
module) checks the rendered groups (`promtool check rules`) and runs unit
tests of their alerts on made-up series (`promtool test rules`).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from common.durations import DURATION_BUCKETS
from devcluster.binaries import ensure_binaries
from injector.config import InjectorConfig
from sidecar.metrics import SidecarMetrics
from tests.kit.chart import CHART, NAMESPACE, helm, run_tool, tool_binaries
from tests.kit.promql import known_names, metric_names, parse

ROOT = Path(__file__).resolve().parent.parent
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"
SCHEMA = CHART / "values.schema.json"
ON = "metrics.prometheusRule.enabled=true"
RULE = ("PrometheusRule", "bento-juicefs", NAMESPACE)
BASE = "https://github.com/bentoml/bento-juicefs/blob/main/docs/troubleshooting.md"

# The fields of an alerting rule in a Prometheus rule file.
RULE_FIELDS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
ALERT_NAME = re.compile(r"^BentoJuiceFS[A-Za-z]+$")
SEVERITIES = {"critical", "warning", "info"}


def rule_object(*sets: str) -> dict[str, Any]:
    rule: dict[str, Any] = helm(ON, *sets)[RULE]
    return rule


def alerts(*sets: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for group in rule_object(*sets)["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] not in found, f"{rule['alert']} twice"
            found[rule["alert"]] = rule
    return found


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped
    (hyphens and underscores kept), spaces as hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_under(doc: str, section: str) -> dict[str, str]:
    """The H3 headings' anchors in one H2 section, to their heading."""
    start = doc.index(f"\n## {section}\n")
    end = doc.find("\n## ", start + 1)
    found = {}
    for line in doc[start : end if end > 0 else None].splitlines():
        if line.startswith("### "):
            found[github_anchor(line[4:])] = line[4:]
    return found


# --- shape ----------------------------------------------------------------------


def test_off_by_default() -> None:
    assert not [key for key in helm() if key[0] == "PrometheusRule"]


def test_the_rule_has_prometheus_shape() -> None:
    rule = rule_object()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule["spec"]["groups"]
    names = [group["name"] for group in groups]
    assert len(names) == len(set(names))
    assert names == [
        "bento-juicefs-" + n for n in ("injector", "apiserver", "sidecars", "node-agents")
    ]
    for group in groups:
        assert set(group) == {"name", "rules"}, group["name"]
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            where = rule.get("alert", rule)
            assert set(rule) <= RULE_FIELDS, where
            assert ALERT_NAME.match(rule["alert"]), where
            assert isinstance(rule["expr"], str), where
            if "for" in rule:
                assert DURATION.match(rule["for"]), where
            assert rule["labels"]["severity"] in SEVERITIES, where
            assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, where
            for text in rule["annotations"].values():
                assert isinstance(text, str), where
                assert text.strip(), where
                assert "{{" not in text.replace("{{ $", ""), f"{where}: Helm left a template"


def test_every_expression_reads_metrics_that_exist() -> None:
    known = known_names()
    problems = []
    for name, rule in alerts().items():
        read = metric_names(rule["expr"])
        assert read, f"{name} reads no metric"
        problems += [f"{name}: {metric}" for metric in sorted(read - known)]
    assert not problems, "neither the code's nor a listed upstream metric: " + "; ".join(problems)


def test_the_apiserver_alerts_read_only_this_projects_webhook_and_policy() -> None:
    webhook = InjectorConfig().webhook.name
    for name, rule in alerts().items():
        expr = rule["expr"]
        if "apiserver_admission_webhook_" in expr:
            assert f'name="{webhook}"' in expr, name
        if "apiserver_validating_admission_policy_" in expr:
            assert 'policy="bento-juicefs-sidecar-required"' in expr, name
            assert 'enforcement_action="deny"' in expr, name


def test_the_issues_alerts_are_all_there() -> None:
    """Cert expiry, webhook errors and latency, the apiserver's fail-open and
    rejections, sidecar-required denials, warmup failures, the time-to-ready
    SLO, a node cache over 90% of its budget, agent failures and absence."""
    read: dict[str, set[str]] = {name: metric_names(r["expr"]) for name, r in alerts().items()}
    wanted = {
        "BentoJuiceFSCertificateExpiring": "bento_juicefs_certificate_expiry_timestamp_seconds",
        "BentoJuiceFSWebhookErrors": "bento_juicefs_admission_requests_total",
        "BentoJuiceFSWebhookSlow": "bento_juicefs_admission_duration_seconds_bucket",
        "BentoJuiceFSWebhookSlowFromTheApiserver": (
            "apiserver_admission_webhook_admission_duration_seconds_bucket"
        ),
        "BentoJuiceFSWebhookFailOpen": "apiserver_admission_webhook_fail_open_count",
        "BentoJuiceFSWebhookCallsRejected": "apiserver_admission_webhook_rejection_count",
        "BentoJuiceFSSidecarRequiredDenials": "apiserver_validating_admission_policy_check_total",
        "BentoJuiceFSWarmupFailed": "bento_juicefs_sidecar_warmup_failures_total",
        "BentoJuiceFSTimeToReadySLO": (
            "bento_juicefs_sidecar_time_to_ready_histogram_seconds_bucket"
        ),
        "BentoJuiceFSNodeCacheNearBudget": "bento_juicefs_node_cache_budget_bytes",
        "BentoJuiceFSNodeAgentFailures": "bento_juicefs_node_agent_outcomes_total",
        "BentoJuiceFSNodeAgentDown": "up",
        "BentoJuiceFSNodeAgentMissing": "kube_daemonset_status_number_unavailable",
    }
    for name, metric in wanted.items():
        assert metric in read.get(name, set()), name
    assert "> 0.9" in alerts()["BentoJuiceFSNodeCacheNearBudget"]["expr"]


# --- runbooks and docs ------------------------------------------------------------


def test_every_alert_links_to_its_own_troubleshooting_entry() -> None:
    entries = anchors_under(TROUBLESHOOTING.read_text(), "Alerts")
    for name, rule in alerts().items():
        url = rule["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == BASE, name
        assert anchor in entries, f"{name}: no entry #{anchor} under Alerts in troubleshooting.md"
        assert entries[anchor] == f"`{name}`", name
    # No entry outlives its alert.
    assert set(entries) == {name.lower() for name in alerts()}


def test_the_anchor_is_githubs() -> None:
    assert github_anchor("`BentoJuiceFSWebhookFailOpen`") == "bentojuicefswebhookfailopen"
    assert github_anchor("Webhook errors") == "webhook-errors"
    assert github_anchor("`the injector is overloaded`") == "the-injector-is-overloaded"


def test_every_alert_is_in_the_metrics_doc_table() -> None:
    doc = METRICS_DOC.read_text()
    start = doc.index("\n## Alerts\n")
    section = doc[start : doc.index("\n## ", start + 1)]
    listed = set(re.findall(r"^\| `(BentoJuiceFS\w+)` \|", section, re.M))
    assert listed == set(alerts())


# --- values -----------------------------------------------------------------------


def test_labels_disabled_alerts_and_the_runbook_base() -> None:
    rule = rule_object(
        "metrics.prometheusRule.labels.release=prom",
        "metrics.prometheusRule.alertLabels.team=platform",
        "metrics.prometheusRule.disabled={BentoJuiceFSWebhookDenials,BentoJuiceFSNodeCacheOverBudget}",
        "metrics.prometheusRule.runbookBaseURL=https://docs.example.com/troubleshooting",
    )
    assert rule["metadata"]["labels"]["release"] == "prom"
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "BentoJuiceFSWebhookDenials" not in rules
    assert "BentoJuiceFSNodeCacheOverBudget" not in rules
    assert set(alerts()) - set(rules) == {
        "BentoJuiceFSWebhookDenials",
        "BentoJuiceFSNodeCacheOverBudget",
    }
    for name, r in rules.items():
        assert r["labels"]["team"] == "platform", name
        assert r["annotations"]["runbook_url"] == (
            f"https://docs.example.com/troubleshooting#{name.lower()}"
        )
    # An alert label never overrides the alert's own severity.
    override = alerts("metrics.prometheusRule.alertLabels.severity=page")
    assert override["BentoJuiceFSModelVerificationFailed"]["labels"]["severity"] == "critical"


def test_the_thresholds_are_values() -> None:
    changed = alerts(
        "metrics.prometheusRule.certificateExpiry.warningDays=30",
        "metrics.prometheusRule.webhookErrors.ratio=0.05",
        "metrics.prometheusRule.webhookLatency.injectorSeconds=0.5",
        "metrics.prometheusRule.webhookLatency.apiserverSeconds=2",
        "metrics.prometheusRule.timeToReady.seconds=300",
        "metrics.prometheusRule.timeToReady.objective=0.99",
        "metrics.prometheusRule.timeToReady.window=1d",
        "metrics.prometheusRule.timeToReady.notReadyFor=1h",
        "metrics.prometheusRule.nodeCache.usedRatio=0.8",
        "metrics.prometheusRule.jobs.nodeAgent=agents",
    )
    assert "< 30 * 86400" in changed["BentoJuiceFSCertificateExpiring"]["expr"]
    assert changed["BentoJuiceFSWebhookErrors"]["expr"].endswith("> 0.05")
    assert changed["BentoJuiceFSWebhookSlow"]["expr"].endswith("> 0.5")
    assert changed["BentoJuiceFSWebhookSlowFromTheApiserver"]["expr"].endswith("> 2")
    slo = changed["BentoJuiceFSTimeToReadySLO"]["expr"]
    assert 'le="300.0"' in slo
    assert "< 0.99" in slo
    assert "[1d]" in slo
    assert changed["BentoJuiceFSPodNotReady"]["for"] == "1h"
    assert "> 0.8" in changed["BentoJuiceFSNodeCacheNearBudget"]["expr"]
    assert changed["BentoJuiceFSNodeAgentDown"]["expr"] == 'up{job="agents"} == 0'
    for rule in changed.values():
        parse(rule["expr"])


def test_the_slo_bound_is_a_bucket_as_the_sidecar_labels_it() -> None:
    """The schema allows only the histogram's bounds, and the rule spells the `le`
    label as prometheus_client does (600.0, 2.5)."""
    schema = yaml.safe_load(SCHEMA.read_text())
    ready = schema["properties"]["metrics"]["properties"]["prometheusRule"]["properties"]
    allowed = ready["timeToReady"]["properties"]["seconds"]["enum"]
    # Each bound, as a number, and the non-integer ones as `--set` passes them (strings).
    assert [b for b in allowed if not isinstance(b, str)] == list(DURATION_BUCKETS)
    assert [b for b in allowed if isinstance(b, str)] == [
        str(b) for b in DURATION_BUCKETS if b != int(b)
    ]
    scraped = generate_latest(SidecarMetrics().registry).decode()
    bounds = set(
        re.findall(
            r'^bento_juicefs_sidecar_time_to_ready_histogram_seconds_bucket\{le="([^"]+)"\}',
            scraped,
            re.M,
        )
    )
    for bound in (2.5, 600):
        expr = alerts(f"metrics.prometheusRule.timeToReady.seconds={bound}")[
            "BentoJuiceFSTimeToReadySLO"
        ]["expr"]
        (le,) = re.findall(r'le="([^"]+)"', expr)
        assert le in bounds, (bound, le)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("metrics.prometheusRule.timeToReady.seconds=700", "timeToReady"),
        ("metrics.prometheusRule.nodeCache.usedRatio=1.5", "usedRatio"),
        ("metrics.prometheusRule.timeToReady.objective=0", "objective"),
        ("metrics.prometheusRule.webhookErrors.ratio=lots", "ratio"),
        ("metrics.prometheusRule.runbookBaseURL=docs/troubleshooting.md", "runbookBaseURL"),
        ("metrics.prometheusRule.timeToReady.window=6 hours", "window"),
        ("metrics.prometheusRule.thresholds=1", "thresholds"),
    ],
)
def test_the_schema_refuses(value: str, message: str) -> None:
    args = [str(tool_binaries()["helm"]), "template", "x", str(CHART), "--set", ON, "--set", value]
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode != 0, value
    assert message in proc.stderr, proc.stderr


def test_without_the_node_agent_its_alerts_are_left_out() -> None:
    names = set(alerts("nodeAgent.enabled=false"))
    assert not [n for n in names if "Node" in n]
    assert "BentoJuiceFSTimeToReadySLO" in names


def test_helm_lint_passes_with_the_rule() -> None:
    run_tool([str(tool_binaries()["helm"]), "lint", "--strict", str(CHART), "--set", ON])


def promtool() -> str:
    """The pinned promtool (hack/binaries/promtool), built like the other binaries."""
    return str(ensure_binaries(["promtool"])["promtool"])


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_object()["spec"]["groups"]}))
    run_tool([promtool(), "check", "rules", str(path)])


NODE_AGENT_JOB = "bento-juicefs-system/bento-juicefs-node-agent"
INJECTOR_JOB = "bento-juicefs-injector"
# Each case: the alert; the series fed in (promtool's notation: a value every
# minute); when the rules are evaluated; and the labels the alert then has
# besides the rule's own (None: the alert does not fire then).
FIRING: list[tuple[str, dict[str, str], str, dict[str, str] | None]] = [
    (
        "BentoJuiceFSCertificateExpiringSoon",
        {'bento_juicefs_certificate_expiry_timestamp_seconds{pod="injector-0"}': "3600+0x30"},
        "15m",
        {"pod": "injector-0"},
    ),
    (  # not before its `for` (10m)
        "BentoJuiceFSCertificateExpiringSoon",
        {'bento_juicefs_certificate_expiry_timestamp_seconds{pod="injector-0"}': "3600+0x30"},
        "5m",
        None,
    ),
    (  # a certificate good for years
        "BentoJuiceFSCertificateExpiringSoon",
        {'bento_juicefs_certificate_expiry_timestamp_seconds{pod="injector-0"}': "1e9+0x30"},
        "15m",
        None,
    ),
    (
        "BentoJuiceFSInjectorDown",
        {f'up{{job="{INJECTOR_JOB}",instance="10.0.0.1:9443"}}': "0+0x10"},
        "8m",
        {},  # absent() of a comparison carries none of the selector's labels
    ),
    (
        "BentoJuiceFSInjectorDown",
        {f'up{{job="{INJECTOR_JOB}",instance="10.0.0.1:9443"}}': "1+0x10"},
        "8m",
        None,
    ),
    (
        "BentoJuiceFSNodeAgentDown",
        {f'up{{job="{NODE_AGENT_JOB}",instance="node-1"}}': "0+0x20"},
        "15m",
        {"job": NODE_AGENT_JOB, "instance": "node-1"},
    ),
    (
        "BentoJuiceFSNodeCacheOverBudget",
        {'bento_juicefs_node_cache_bentos{state="over-budget",node="node-1"}': "1+0x40"},
        "35m",
        {"state": "over-budget", "node": "node-1"},
    ),
    (  # over budget for less than its `for` (30m)
        "BentoJuiceFSNodeCacheOverBudget",
        {'bento_juicefs_node_cache_bentos{state="over-budget",node="node-1"}': "1+0x40"},
        "20m",
        None,
    ),
]


def test_promtool_fires_the_alerts_on_their_series_and_only_then(tmp_path: Path) -> None:
    """`promtool test rules` on the chart's rules: each case's alert fires with the labels
    expected, after its `for`, and not on healthy series. Annotations are left out of the
    rules tested (their templates are checked by `promtool check rules` above)."""
    groups = rule_object()["spec"]["groups"]
    own_labels: dict[str, dict[str, str]] = {}
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
            own_labels[rule["alert"]] = rule.get("labels") or {}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = []
    for alert, series, at, labels in FIRING:
        expected = [] if labels is None else [{"exp_labels": {**own_labels[alert], **labels}}]
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": expected}],
            }
        )
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    run_tool([promtool(), "test", "rules", str(tmp_path / "tests.yaml")])
