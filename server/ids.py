"""What requests and flags may name as an adapter: `name`, an alias, `name@VERSION`, or `base`.

Ids are matched whole (fullmatch): with `match` and a `$` anchor, "legal\\n" passed as `legal`.
"""

from __future__ import annotations

from registry.passport import ADAPTER_ID


def is_adapter_id(text: str) -> bool:
    return ADAPTER_ID.fullmatch(text) is not None
