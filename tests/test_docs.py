"""The config reference documents every key the code has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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
