"""What client and server agree on besides the messages; both sides import it from here.

Pure Python (no grpc, no protobuf): the registry and the scheduler use the id rules too.
"""

from __future__ import annotations

import re

ROUTING_HEADER = "x-adapter-id"
"""Metadata every inference call carries with its adapter id, so a proxy or gRPC's ring_hash
can keep an adapter on one replica; the server refuses a call whose header and adapter_id differ."""

BASE_ADAPTER_ID = "base"
"""The id that names the bare base model."""
RESERVED_IDS = frozenset({BASE_ADAPTER_ID})
"""Ids the contract gives a meaning of their own: no adapter may take one as its name or alias
(`base` as a name would make `base` the bare model and `base@1` an adapter)."""

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""An adapter name or alias; matched whole (fullmatch) wherever an id is checked."""
ADAPTER_ID = re.compile(rf"(?P<name>{NAME.pattern})(?:@(?P<version>[0-9]{{1,9}}))?")
"""What a caller may name: a name, an alias or name@VERSION (never a path)."""


def versioned(name: str, version: str) -> str:
    """`name@version`: how an adapter version is written in requests, logs, errors and the index."""
    return f"{name}@{version}"


def name_problem(name: str) -> str | None:
    """Why `name` cannot be an adapter's name or alias; None when it can."""
    if NAME.fullmatch(name) is None:
        return f"{name!r} must be letters, digits, '-' or '_' (at most 64, starting with a letter or digit)"
    if name in RESERVED_IDS:
        return f"{name!r} is reserved: it names the bare base model"
    return None


def adapter_id_problem(adapter_id: str) -> str | None:
    """Why `adapter_id` cannot be sent, said of the field; None when it can. Matched whole:
    with a `$` anchor "legal\\n" would pass as `legal`."""
    if not adapter_id:
        return f"is required (an adapter id, or {BASE_ADAPTER_ID!r} for the bare model)"
    if ADAPTER_ID.fullmatch(adapter_id) is None:
        return "must be a name of letters, digits, '-' or '_' with an optional '@VERSION' (paths are not accepted)"
    return None
