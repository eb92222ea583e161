from __future__ import annotations

from typing import Any

import jsonpatch

from injector.patch import PatchBuilder, pointer


def apply(doc: dict[str, Any], builder: PatchBuilder) -> dict[str, Any]:
    result: dict[str, Any] = jsonpatch.apply_patch(doc, builder.ops)
    return result


def test_pointer_escapes_slash_and_tilde() -> None:
    assert pointer(("metadata", "annotations", "juicefs.bentoml.com/status")) == (
        "/metadata/annotations/juicefs.bentoml.com~1status"
    )
    assert pointer(("a~b", 0)) == "/a~0b/0"


def test_appends_to_absent_list_fold_into_one_add() -> None:
    doc: dict[str, Any] = {"spec": {}}
    builder = PatchBuilder(doc)
    builder.append(("spec", "volumes"), {"name": "a"})
    builder.append(("spec", "volumes"), {"name": "b"})
    assert builder.ops == [
        {"op": "add", "path": "/spec/volumes", "value": [{"name": "a"}, {"name": "b"}]}
    ]


def test_appends_to_existing_list_use_dash() -> None:
    doc: dict[str, Any] = {"spec": {"volumes": [{"name": "x"}]}}
    builder = PatchBuilder(doc)
    builder.append(("spec", "volumes"), {"name": "a"})
    assert builder.ops == [{"op": "add", "path": "/spec/volumes/-", "value": {"name": "a"}}]
    assert apply(doc, builder)["spec"]["volumes"] == [{"name": "x"}, {"name": "a"}]


def test_set_creates_missing_parents_in_one_operation() -> None:
    doc: dict[str, Any] = {"spec": {}}
    builder = PatchBuilder(doc)
    builder.append(("spec", "affinity", "nodeAffinity", "preferred"), 1)
    builder.append(("spec", "affinity", "nodeAffinity", "required", "terms"), 2)
    assert len(builder.ops) == 1
    assert apply(doc, builder) == {
        "spec": {"affinity": {"nodeAffinity": {"preferred": [1], "required": {"terms": [2]}}}}
    }


def test_set_replaces_existing_value_and_treats_null_as_absent() -> None:
    doc: dict[str, Any] = {"metadata": {"annotations": {"k": "old"}}, "spec": {"volumes": None}}
    builder = PatchBuilder(doc)
    builder.set(("metadata", "annotations", "k"), "new")
    builder.append(("spec", "volumes"), "v")
    assert apply(doc, builder) == {
        "metadata": {"annotations": {"k": "new"}},
        "spec": {"volumes": ["v"]},
    }


def test_insert_at_front_or_create() -> None:
    doc: dict[str, Any] = {"spec": {"initContainers": [{"name": "a"}]}}
    builder = PatchBuilder(doc)
    builder.insert(("spec", "initContainers"), 0, {"name": "ours"})
    assert apply(doc, builder)["spec"]["initContainers"] == [{"name": "ours"}, {"name": "a"}]
    empty: dict[str, Any] = {"spec": {}}
    builder = PatchBuilder(empty)
    builder.insert(("spec", "initContainers"), 0, {"name": "ours"})
    assert apply(empty, builder)["spec"]["initContainers"] == [{"name": "ours"}]


def test_builder_never_mutates_the_input() -> None:
    doc: dict[str, Any] = {"spec": {"volumes": [{"name": "x"}]}}
    builder = PatchBuilder(doc)
    builder.append(("spec", "volumes"), {"name": "a"})
    builder.set(("spec", "affinity", "x"), 1)
    assert doc == {"spec": {"volumes": [{"name": "x"}]}}
