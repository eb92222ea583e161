"""Kubernetes resource quantities and Go-style durations, parsed strictly.

Annotations carry these as strings; a value the apiserver would reject must
be rejected here first, with a message that says what is accepted.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
# ASCII digits only, and short: a quantity is attacker-supplied (an annotation)
# and must never cost more than a regex match and a small Decimal.
MAX_QUANTITY_CHARS = 32
MAX_EXPONENT = 18
_QUANTITY_RE = re.compile(
    r"^(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]{1,2})?$",
    re.ASCII,
)

QUANTITY_FORM = "a Kubernetes quantity such as 20Gi, 500Mi or 1.5G"


class QuantityError(ValueError):
    pass


def parse_quantity(text: str) -> Decimal:
    """Return the quantity's value in base units (bytes, cores)."""
    if not isinstance(text, str) or len(text) > MAX_QUANTITY_CHARS:
        raise QuantityError(f"{str(text)[:40]!r} is not {QUANTITY_FORM}")
    # Exactly as written, no surrounding spaces: the value goes into the pod as is.
    match = _QUANTITY_RE.fullmatch(text)
    if match is None:
        raise QuantityError(f"{text!r} is not {QUANTITY_FORM}")
    try:
        number = Decimal(match.group("num"))
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise QuantityError(f"{text!r} is not {QUANTITY_FORM}") from None
    suffix = match.group("suffix") or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    exponent = int(suffix[1:])
    if abs(exponent) > MAX_EXPONENT:
        raise QuantityError(f"{text!r} is not {QUANTITY_FORM}")
    return number * (Decimal(10) ** exponent)


_DURATION_PART_RE = re.compile(r"([0-9]{1,6}(?:\.[0-9]{1,6})?)(h|m|s)", re.ASCII)
MAX_DURATION_CHARS = 24
DURATION_FORM = "a duration such as 30m, 900s or 1h30m"


class DurationError(ValueError):
    pass


def parse_duration_seconds(text: str) -> int:
    """Parse '1h30m', '45m', '900s' or a bare number of seconds."""
    stripped = text.strip()
    if len(stripped) > MAX_DURATION_CHARS:
        raise DurationError(f"{stripped[:30]!r}... is not {DURATION_FORM}")
    if stripped.isascii() and stripped.isdigit():
        return int(stripped)
    pos, total = 0, Decimal(0)
    for match in _DURATION_PART_RE.finditer(stripped):
        if match.start() != pos:
            break
        scale = {"h": 3600, "m": 60, "s": 1}[match.group(2)]
        total += Decimal(match.group(1)) * scale
        pos = match.end()
    if pos == 0 or pos != len(stripped):
        raise DurationError(f"{text!r} is not {DURATION_FORM}")
    return int(total)
