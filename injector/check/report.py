"""What the command prints: the table, or the same findings as a JSON or YAML document.

The document is for scripts (CI gates, dashboards): the cluster, the config
checked against, and every line with its stable ID, so a script matches on
`id` and `verdict` and never parses the table. The exit code does not
depend on the format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal, get_args

import yaml

from injector.check.rows import Row
from injector.check.table import format_table
from injector.config import InjectorConfig

OutputFormat = Literal["table", "json", "yaml"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)


def heading(cluster: str, config_source: str, config: InjectorConfig) -> str:
    """The line above the table: where, and against which config."""
    return (
        f"cluster {cluster}; config {config_source}: profile "
        f"{config.cluster.platform_profile}, cache mode {config.cache_mode}, "
        f"ssdPolicy {config.scheduling.ssd_policy}\n"
    )


def summary(rows: Sequence[Row]) -> dict[str, int]:
    """How many lines of each verdict, under lowercase keys (`fail` counts the FAIL lines)."""
    return {
        "ok": sum(row.verdict == "ok" for row in rows),
        "warn": sum(row.verdict == "warn" for row in rows),
        "fail": sum(row.verdict == "FAIL" for row in rows),
    }


def check_document(
    rows: Sequence[Row], cluster: str, config_source: str, config: InjectorConfig
) -> dict[str, Any]:
    """The findings as plain data: what `-o json` and `-o yaml` print.

    Every line's fields, `fix` included when empty, so each check has the
    same keys; verdicts as the table shows them (`ok`, `warn`, `FAIL`).
    """
    return {
        "cluster": cluster,
        "config": config_source,
        "profile": config.cluster.platform_profile,
        "cacheMode": config.cache_mode,
        "ssdPolicy": config.scheduling.ssd_policy,
        "checks": [
            {
                "id": row.id,
                "verdict": row.verdict,
                "subject": row.subject,
                "found": row.found,
                "fix": row.fix,
            }
            for row in rows
        ],
        "summary": summary(rows),
    }


def format_report(
    output: OutputFormat,
    rows: Sequence[Row],
    cluster: str,
    config_source: str,
    config: InjectorConfig,
) -> str:
    """The text the command prints, in the format asked for."""
    if output == "table":
        return format_table(rows, heading(cluster, config_source, config))
    document = check_document(rows, cluster, config_source, config)
    if output == "json":
        return json.dumps(document, indent=2) + "\n"
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
