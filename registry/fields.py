"""A passport block read from JSON: an object whose every key is one of the dataclass's fields."""

from __future__ import annotations

import dataclasses


def from_known(cls, data, label: str):
    """`cls(**data)`; ValueError naming `label` when `data` is no object or has unknown keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{label} must be a JSON object")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{label}: unknown field(s) {sorted(unknown)}")
    return cls(**data)
