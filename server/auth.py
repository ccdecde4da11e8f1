"""Bearer-token authentication: `authorization: Bearer TOKEN` metadata -> a client identity.

The tokens file (JSON) maps each token to its client:

    {"tokens": {"s3cr3t": {"client": "acmelaw"}, "0ps": {"client": "ops", "admin": true}}}

Without a tokens file authentication is off: every caller is the anonymous
client, which may use adapters that list no allowed clients, and the admin
service is open (bind to localhost then).
"""

from __future__ import annotations

import hmac
import json
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from scheduler.errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True)
class Caller:
    client: str | None
    """None when authentication is off (anonymous)."""
    admin: bool


ANONYMOUS = Caller(None, True)

CALLER: ContextVar[Caller] = ContextVar("loraserve_caller")
"""Set by server.interceptors for the RPC being handled."""


def current_caller() -> Caller:
    try:
        return CALLER.get()
    except LookupError:  # a handler reached without the interceptor: refuse rather than guess
        raise Unauthenticated("no authenticated caller for this call") from None


class Authenticator:
    def __init__(self, tokens: dict[str, Caller] | None):
        self._tokens = tokens

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        if path is None:
            return cls(None)
        data = json.loads(Path(path).read_text())
        return cls({token: Caller(entry["client"], bool(entry.get("admin", False)))
                    for token, entry in data["tokens"].items()})

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        if self._tokens is None:
            return ANONYMOUS
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise Unauthenticated("send 'authorization: Bearer TOKEN' metadata")
        token = header.removeprefix("Bearer ").strip()
        # Compare against every token in constant time, so timing tells nothing about near misses.
        match = [caller for known, caller in self._tokens.items() if hmac.compare_digest(known, token)]
        if not match:
            raise Unauthenticated("unknown bearer token")
        return match[0]

    def admin(self, metadata) -> Caller:
        caller = self.identify(metadata)
        if not caller.admin:
            raise PermissionDenied(f"client {caller.client!r} may not use the admin service", client=caller.client or "")
        return caller
