"""What requests and flags may name as an adapter: `name`, an alias, `name@VERSION`, or `base`.

Ids are matched whole (fullmatch): with `match` and a `$` anchor, "legal\\n" passed as `legal`.
"""

from __future__ import annotations

import re

ADAPTER_ID = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,63})(?:@(?P<version>[0-9]{1,9}))?")


def is_adapter_id(text: str) -> bool:
    return ADAPTER_ID.fullmatch(text) is not None
