"""Turning command-line values into the stages' option objects."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def pick(cls: type[T], namespace: Any, **overrides: Any) -> T:
    """Build dataclass `cls` from the attributes of `namespace` named like its fields."""
    values = {f.name: getattr(namespace, f.name) for f in fields(cls) if getattr(namespace, f.name, None) is not None}
    return cls(**(values | overrides))
