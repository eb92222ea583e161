"""docs/troubleshooting.md explains every message the project emits.

The messages are read from the code, not listed by hand: the AST of the
injector, the sidecar and the node agent, and the ValidatingAdmissionPolicies'
YAML. Each message gives one key the doc must contain, in the section of the
one who emits it:

- a denial, warning or error string: a stable fragment of it. From a plain
  string, its text up to the first ": ", "; " or ". " that leaves at
  least three words ("e.g. " does not cut). From an f-string (or "..." + x), the first constant
  part that has three words once cut the same way; failing that, its longest
  constant part. What the pod's values fill in is never part of a key.
- an Event or condition: its reason, in backticks.
- a policy's `message`: the fragment of its text; a `messageExpression`: the
  fragment of its first CEL string literal with three words.

Where the message is sent is found by shape, so new messages are picked up:
`Deny(...)`, `Deny.of([...])`, `_deny(uid, ...)`, `errors/problems/parts
.append(...)`, a list comprehension of f-strings (conflicts.py), the message
builders `_bad`, `describe`, `_message`; `ctx.warnings.append(...)`; the
server's `_text_error(code, ...)` and `message = ...`; `BadReview(...)` and
`ValueError(...)` in the AdmissionReview parser; any call whose first argument
is `NORMAL` or `WARNING` (the Event kind) for Events, with a reason that is a
parameter followed to its callers (and `type(err).__name__.replace(...)` to
the exception classes of its `except`); `set_condition`/`post_condition` and
`GatePlan(reason=...)` for the readiness condition.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from common import env
from injector.config import InjectorConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "troubleshooting.md"

# Who emits a message: the doc's H2 section it must be in.
DENIAL = "Webhook denials"
WARNING = "Webhook warnings"
ERROR = "Webhook errors"
POLICY = "Admission policy denials"
SIDECAR_EVENT = "Sidecar Events"
CONDITION = "Sidecar condition reasons"
AGENT_EVENT = "Node agent Events"
GROUPS = (DENIAL, WARNING, ERROR, POLICY, SIDECAR_EVENT, CONDITION, AGENT_EVENT)

# The injector modules that refuse, warn or fail a request.
INJECTOR_FILES = (
    "injector/plan.py",
    "injector/admission.py",
    "injector/podshape.py",
    "injector/server.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "injector" / "mutation").glob("*.py")),
)
SIDECAR_FILES = tuple(sorted(str(p.relative_to(ROOT)) for p in (ROOT / "sidecar").glob("*.py")))
AGENT_FILES = tuple(sorted(str(p.relative_to(ROOT)) for p in (ROOT / "nodeagent").glob("*.py")))
POLICY_FILES = tuple(sorted((ROOT / "manifests" / "base").glob("policy-*.yaml")))

# Functions whose returned string is (part of) a denial.
MESSAGE_BUILDERS = {
    ("injector/plan.py", "_bad"),
    ("injector/podshape.py", "describe"),
}
# The AdmissionReview parser: its messages are 400 answers, not denials.
PARSER_FUNCTIONS = {"_describe", "parse_review", "_object_metadata"}
PROBLEM_LISTS = {"errors", "problems"}
EVENT_KINDS = {"NORMAL", "WARNING"}
MIN_WORDS = 3


@dataclass(frozen=True, order=True)
class Message:
    group: str
    key: str  # what the doc's section must contain
    where: str  # file:line, to find it in the code

    def __str__(self) -> str:
        return f"{self.group}: {self.key!r} ({self.where})"


def normalize(text: str) -> str:
    return " ".join(text.split())


def _trim(text: str) -> str:
    """Without the separators and the bracket a filled-in value leaves at either end."""
    return normalize(text).strip(" :;,.").lstrip(") ").rstrip(" (").strip(" :;,.")


def _words(text: str) -> int:
    return len(text.split())


def text_fragment(text: str) -> str:
    """A string's stable head: up to the first separator that leaves MIN_WORDS words."""
    text = _trim(text)
    for match in re.finditer(r": |; |(?<!e\.g)(?<!i\.e)\. ", text):
        head = _trim(text[: match.start()])
        if _words(head) >= MIN_WORDS:
            return head
    return text


def segments(node: ast.expr) -> list[str | None]:
    """A string expression's parts: constant text, or None for what is filled in."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [
            v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else None
            for v in node.values
        ]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return segments(node.left) + segments(node.right)
    return [None]


def is_text(node: ast.expr) -> bool:
    return any(part is not None for part in segments(node))


def fragment(node: ast.expr) -> str | None:
    """The key of a string expression; None when it has no constant text."""
    parts = [p for p in segments(node) if p is not None]
    for part in parts:
        head = text_fragment(part)
        if _words(head) >= MIN_WORDS:
            return head
    shown = [_trim(p) for p in parts]
    shown = [p for p in shown if p]
    return max(shown, key=len) if shown else None


class _Module:
    def __init__(self, path: str) -> None:
        self.path = path
        self.name = path.removesuffix(".py").replace("/", ".")
        self.tree = ast.parse((ROOT / path).read_text(), filename=path)
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(self.tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent

    def where(self, node: ast.AST) -> str:
        return f"{self.path}:{getattr(node, 'lineno', 0)}"

    def function(self, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node
        return None

    def resolve(self, node: ast.expr) -> list[ast.expr]:
        """A name's string value(s): assigned in the enclosing function, or the module's."""
        if not isinstance(node, ast.Name):
            return [node]
        scope = self.function(node)
        if scope is not None:
            values = [
                a.value
                for a in ast.walk(scope)
                if isinstance(a, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == node.id for t in a.targets)
            ]
            for loop in ast.walk(scope):  # for a, form in ((x, X_FORM), (y, Y_FORM)):
                target, rows = getattr(loop, "target", None), getattr(loop, "iter", None)
                if not (isinstance(loop, ast.For) and isinstance(target, ast.Tuple)):
                    continue
                names = [t.id if isinstance(t, ast.Name) else "" for t in target.elts]
                if node.id in names and isinstance(rows, ast.Tuple | ast.List):
                    at = names.index(node.id)
                    for row in rows.elts:
                        if isinstance(row, ast.Tuple) and len(row.elts) == len(names):
                            values += self.resolve(row.elts[at])
            if values:
                return values
        value = getattr(importlib.import_module(self.name), node.id, None)
        return [ast.Constant(value)] if isinstance(value, str) else []

    def exception_names(self, node: ast.AST, var: str) -> list[str]:
        """The class names an `except (A, B) as var` around node catches."""
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, ast.ExceptHandler) and node.name == var and node.type:
                types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                module = importlib.import_module(self.name)
                return [getattr(module, t.id).__name__ for t in types if isinstance(t, ast.Name)]
        return []

    def reasons(self, node: ast.expr) -> Iterator[tuple[str, ast.AST]]:
        """An Event reason: a literal, a parameter followed to its callers, or a class name."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value, node
            return
        if (  # type(err).__name__.replace("Error", "Failed")
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "replace"
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "__name__"
            and isinstance(node.func.value.value, ast.Call)
            and isinstance(node.func.value.value.args[0], ast.Name)
        ):
            old, new = (str(a.value) for a in node.args if isinstance(a, ast.Constant))
            var = node.func.value.value.args[0].id
            for name in self.exception_names(node, var):
                yield name.replace(old, new), node
            return
        scope = self.function(node)
        if isinstance(node, ast.Name) and scope is not None:
            params = [a.arg for a in scope.args.args]
            if node.id in params:
                index = params.index(node.id) - (1 if params[:1] == ["self"] else 0)
                for call in ast.walk(self.tree):
                    if not (isinstance(call, ast.Call) and _called(call) == scope.name):
                        continue
                    if index < len(call.args):
                        yield from self.reasons(call.args[index])
                return
        raise AssertionError(f"{self.where(node)}: cannot tell this Event reason statically")


def _called(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _receiver(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Attribute):
        value = call.func.value
        if isinstance(value, ast.Name):
            return value.id
        if isinstance(value, ast.Attribute):
            return value.attr
    return None


def _text_messages(module: _Module, group: str, node: ast.expr, site: ast.AST) -> list[Message]:
    found = []
    for value in module.resolve(node):
        key = fragment(value) if is_text(value) else None
        if key is not None:
            found.append(Message(group, key, module.where(site)))
    return found


def injector_messages(path: str) -> list[Message]:
    module = _Module(path)
    found: list[Message] = []
    for node in ast.walk(module.tree):
        scope = module.function(node)
        scope_name = scope.name if scope else ""
        parser = path == "injector/admission.py" and scope_name in PARSER_FUNCTIONS
        group = ERROR if parser or path == "injector/server.py" else DENIAL
        if isinstance(node, ast.Call):
            name, receiver = _called(node), _receiver(node)
            args: list[ast.expr] = []
            if name in ("Deny", "BadReview") or (name == "ValueError" and parser):
                args = node.args[:1]
            elif name in ("_deny", "_text_error"):
                args = node.args[1:2]
            elif name == "of" and receiver == "Deny" and isinstance(node.args[0], ast.List):
                args = list(node.args[0].elts)
            elif name == "_bad":
                args = node.args[2:3]  # the accepted form; the template is _bad's return
            elif name == "append" and (
                receiver in PROBLEM_LISTS or (parser and receiver == "parts")
            ):
                args = node.args[:1]
            elif name == "append" and receiver == "warnings":
                group, args = WARNING, node.args[:1]
            for arg in args:
                found += _text_messages(module, group, arg, node)
        elif isinstance(node, ast.ListComp) and is_text(node.elt):
            found += _text_messages(module, group, node.elt, node)
        elif isinstance(node, ast.Return) and node.value is not None:
            if (path, scope_name) in MESSAGE_BUILDERS and is_text(node.value):
                found += _text_messages(module, group, node.value, node)
        elif isinstance(node, ast.Assign) and path == "injector/server.py":
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            if names == ["message"] and is_text(node.value):
                found += _text_messages(module, group, node.value, node)
    return found


def event_messages(path: str, group: str) -> list[Message]:
    """Event reasons, and (in the sidecar) the condition's reasons."""
    module = _Module(path)
    found: list[Message] = []
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.Call):
            continue
        first = node.args[0] if node.args else None
        if isinstance(first, ast.Name) and first.id in EVENT_KINDS and len(node.args) >= 2:
            for reason, site in module.reasons(node.args[1]):
                found.append(Message(group, f"`{reason}`", module.where(site)))
        name = _called(node)
        if name in ("set_condition", "post_condition") and len(node.args) >= 2:
            given = node.args[1]
            if isinstance(given, ast.Constant) and isinstance(given.value, str):
                found.append(Message(CONDITION, f"`{given.value}`", module.where(node)))
        # The node agent sets a served pod's condition: pod_condition(pod, status, reason, ...).
        if name == "pod_condition" and len(node.args) >= 3:
            given = node.args[2]
            if isinstance(given, ast.Constant) and isinstance(given.value, str):
                found.append(Message(CONDITION, f"`{given.value}`", module.where(node)))
        if name == "GatePlan":
            for keyword in node.keywords:
                value = keyword.value
                if keyword.arg == "reason" and isinstance(value, ast.Constant):
                    found.append(Message(CONDITION, f"`{value.value!s}`", module.where(node)))
    return found


CEL_STRING = re.compile(r"'((?:[^'\\]|\\.)*)'")


def policy_messages(path: Path) -> list[Message]:
    found = []
    where = str(path.relative_to(ROOT))
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "ValidatingAdmissionPolicy":
            continue
        for index, validation in enumerate(doc["spec"].get("validations") or []):
            site = f"{where}: {doc['metadata']['name']} validation {index}"
            if "message" in validation:
                found.append(Message(POLICY, text_fragment(validation["message"]), site))
            elif "messageExpression" in validation:
                literals = CEL_STRING.findall(validation["messageExpression"])
                keys = [text_fragment(s) for s in literals]
                keys = [k for k in keys if _words(k) >= MIN_WORDS]
                assert keys, f"{site}: no CEL string literal of {MIN_WORDS} words"
                found.append(Message(POLICY, keys[0], site))
    return found


def all_messages() -> list[Message]:
    found: list[Message] = []
    for path in INJECTOR_FILES:
        found += injector_messages(path)
    for path in SIDECAR_FILES:
        found += event_messages(path, SIDECAR_EVENT)
    for path in AGENT_FILES:
        found += event_messages(path, AGENT_EVENT)
    for policy in POLICY_FILES:
        found += policy_messages(policy)
    unique: dict[tuple[str, str], Message] = {}
    for message in found:
        unique.setdefault((message.group, message.key), message)
    return sorted(unique.values())


def sections(doc: str) -> dict[str, str]:
    """The doc's H2 sections by title, whitespace collapsed (a key may wrap lines)."""
    found: dict[str, str] = {}
    title = ""
    for line in doc.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            found[title] = ""
        elif title:
            found[title] += line + "\n"
    return {t: normalize(text) for t, text in found.items()}


def missing(messages: list[Message], doc: str) -> list[Message]:
    """The messages whose key is not in their section of doc."""
    by_title = sections(doc)
    return [m for m in messages if normalize(m.key) not in by_title.get(m.group, "")]


# ---- the doc against the code ----


def test_every_message_in_the_code_is_in_troubleshooting_md() -> None:
    lacking = missing(all_messages(), DOC.read_text())
    assert not lacking, "docs/troubleshooting.md lacks (add each, with its cause and fix):\n" + (
        "\n".join(f"  {m}" for m in lacking)
    )


def test_every_section_is_there_and_finds_messages() -> None:
    titles = sections(DOC.read_text())
    messages = all_messages()
    for group in GROUPS:
        assert group in titles, f"docs/troubleshooting.md has no section '## {group}'"
        assert any(m.group == group for m in messages), f"no message found for {group}"


def test_the_extraction_finds_what_a_reader_would() -> None:
    keys = {(m.group, m.key) for m in all_messages()}
    expected = {
        (DENIAL, "is invalid: expected"),  # _bad's template
        (DENIAL, "'true' or 'false'"),  # a form passed to _bad by its module constant
        (DENIAL, "already has a container named"),
        (DENIAL, "not what the injector creates"),
        (DENIAL, "the pod is not a well-formed Kubernetes Pod"),  # "..." + x
        (DENIAL, "is a classic (non-native) mesh proxy"),  # a list comprehension
        (DENIAL, text_fragment(env.NAME_FORM)),  # a form from a for loop's tuples
        (WARNING, "hostNetwork without dnsPolicy ClusterFirstWithHostNet"),
        (ERROR, "AdmissionReview body exceeds the configured limit of"),
        (ERROR, "JuiceFS model injection failed inside the injector"),
        (SIDECAR_EVENT, "`WarmupResumed`"),  # sent by ProgressReporter._send
        (CONDITION, "`ModelsCached`"),  # GatePlan(reason=...)
        (AGENT_EVENT, "`WarmFailed`"),  # a parameter followed to its caller
        (AGENT_EVENT, "`WarmupTimedOut`"),  # a literal passed to _failed
        (AGENT_EVENT, "`VerificationFailed`"),
        (POLICY, "the injected juicefs-mount container cannot be changed after the pod is created"),
    }
    assert expected <= keys, sorted(expected - keys)
    assert not [k for _, k in keys if _words(k.strip("`")) == 0]


def test_the_message_builders_still_exist() -> None:
    for path, name in MESSAGE_BUILDERS:
        tree = ast.parse((ROOT / path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"{path} has no {name}(): update MESSAGE_BUILDERS"


def test_every_label_and_annotation_a_denial_names_is_in_the_doc() -> None:
    config = InjectorConfig()
    keys = [*config.labels.model_dump().values(), *config.annotations.model_dump().values()]
    denials = sections(DOC.read_text())[DENIAL]
    lacking = [k for k in keys if "/" in k and k not in denials]
    assert not lacking, f"{DENIAL} lacks: {lacking}"


# ---- the checker itself ----


def test_the_checker_names_an_entry_removed_from_the_doc() -> None:
    """The real doc with one Event taken out: that Event, and only it, is reported."""
    doc = DOC.read_text()
    messages = all_messages()
    assert missing(messages, doc) == []
    body = sections(doc)[SIDECAR_EVENT]
    assert "`WarmupStalled`" in body
    start = doc.index(f"## {SIDECAR_EVENT}")
    end = doc.index("\n## ", start + 1)
    without = doc[:start] + doc[start:end].replace("`WarmupStalled`", "") + doc[end:]
    lacking = missing(messages, without)
    assert [(m.group, m.key) for m in lacking] == [(SIDECAR_EVENT, "`WarmupStalled`")]
    assert "sidecar/progress.py:" in lacking[0].where


def test_a_key_in_the_wrong_section_does_not_count() -> None:
    doc = "## Webhook denials\n`WarmupStalled`\n## Sidecar Events\nnothing here\n"
    message = Message(SIDECAR_EVENT, "`WarmupStalled`", "sidecar/run.py:1")
    assert missing([message], doc) == [message]


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ('"plain text here: and more"', "plain text here"),
        ('f"{kind} {key}={value} is invalid: expected {form}"', "is invalid: expected"),
        ('f"pod {name}: a token may set only its own pod"', "a token may set only its own pod"),
        ('f"x {a} y {b}"', "x"),  # no part of three words: the longest
        ('"the pod is not well formed: " + "; ".join(p)', "the pod is not well formed"),
        ('f"a b ({c}) d e f"', "d e f"),
        ('"a list of tags, e.g. x,y. More"', "a list of tags, e.g. x,y"),
        ("f'{a}'", None),
    ],
)
def test_fragment_of_a_string_expression(source: str, key: str | None) -> None:
    node = ast.parse(source, mode="eval").body
    assert fragment(node) == key


def test_event_reasons_through_a_parameter_and_an_exception_class() -> None:
    module = _Module("nodeagent/agent.py")
    calls = [
        n
        for n in ast.walk(module.tree)
        if isinstance(n, ast.Call)
        and n.args
        and isinstance(n.args[0], ast.Name)
        and n.args[0].id == "WARNING"
        and isinstance(n.args[1], ast.Name)
    ]
    assert calls, "the agent's _failed sends its reason parameter"
    reasons = {r for call in calls for r, _ in module.reasons(call.args[1])}
    assert {"WarmFailed", "VerificationFailed", "WarmupTimedOut"} <= reasons


def test_no_event_or_condition_row_outlives_its_reason() -> None:
    """A reason renamed in the code leaves no stale row behind."""
    found = {(m.group, m.key) for m in all_messages()}
    doc = DOC.read_text()
    stale, rows = [], 0
    for group in (SIDECAR_EVENT, CONDITION, AGENT_EVENT):
        start = doc.index(f"## {group}\n")
        end = doc.find("\n## ", start + 1)
        for line in doc[start : end if end > 0 else None].splitlines():
            match = re.match(r"^\| (`\w+`) \|", line)
            rows += bool(match)
            if match and (group, match[1]) not in found:
                stale.append(f"{group}: {match[1]}")
    assert rows == sum(1 for g, _ in found if g in (SIDECAR_EVENT, CONDITION, AGENT_EVENT))
    assert not stale, f"docs/troubleshooting.md documents reasons the code no longer has: {stale}"
