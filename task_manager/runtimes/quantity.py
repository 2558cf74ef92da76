"""Sizes as users write them in a spec's ``resources``, for the runtimes that need a number."""

from __future__ import annotations

import re

_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50, "ei": 2**60}
_DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_DOCKER = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def memory_bytes(text: str) -> int:
    """A memory size as Docker ("512m", "2g": binary) or Kubernetes ("2Gi", "500M") spells it."""
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"memory {text!r}: expected a number with an optional unit (512m, 2g, 2Gi, 500M)")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "":
        factor = 1
    elif unit.lower() in _BINARY and unit[1] == "i":
        factor = _BINARY[unit.lower()]
    elif unit in _DOCKER:  # lower case: Docker's binary units ("k" too, unlike Kubernetes)
        factor = _DOCKER[unit]
    elif unit in _DECIMAL:
        factor = _DECIMAL[unit]
    elif len(unit) == 2 and unit.lower()[1] == "b" and unit.lower()[0] in _DOCKER:  # "512mb", "2GB"
        factor = _DOCKER[unit.lower()[0]]
    else:
        raise ValueError(f"memory {text!r}: unknown unit {unit!r}")
    return int(number * factor)
