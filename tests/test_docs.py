"""The config reference documents every key the code has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common import env
from injector.config import InjectorConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    keys: list[str] = []
    for key, value in node.items():
        if prefix == "cluster.profiles":
            keys.extend(leaf_keys(value, "cluster.profiles.NAME"))
            continue
        keys.extend(leaf_keys(value, f"{prefix}.{key}" if prefix else key))
    return keys


def test_every_config_key_is_documented() -> None:
    text = DOC.read_text()
    data = yaml.safe_load(InjectorConfig().to_yaml())
    missing = sorted({key for key in leaf_keys(data) if f"`{key}`" not in text})
    assert not missing, f"docs/configuration.md lacks: {missing}"


def test_every_sidecar_variable_is_documented_with_its_default() -> None:
    rows = {
        line.split("|")[1].strip(): line
        for line in DOC.read_text().splitlines()
        if line.startswith("| `")
    }
    for var in env.ALL:
        row = rows.get(f"`{var.name}`")
        assert row is not None, f"docs/configuration.md lacks {var.name}"
        cells = [cell.strip() for cell in row.split("|")]
        default = cells[3]
        if var.default is None:
            assert default == "required", var.name
        elif var.default:
            assert default == f"`{var.default}`", var.name
        else:
            assert default.startswith("empty"), var.name
