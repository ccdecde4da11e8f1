"""Bearer-token authentication: `authorization: Bearer TOKEN` metadata -> a client identity.

The tokens file (JSON) maps each token to its client:

    {"tokens": {"s3cr3t": {"client": "acmelaw"}, "0ps": {"client": "ops", "admin": true}}}

Without a tokens file authentication is off: every caller is the anonymous
client, which may use adapters that list no allowed clients, and the admin
service is open (bind to localhost then).

A token must be sendable as gRPC metadata (printable ASCII, no surrounding spaces); the
file is checked when the server starts, so a token no client could send is a start-up
error, not a server that refuses everyone.
"""

from __future__ import annotations

import hmac
import json
import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from loraserve.scheduler.errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True)
class Caller:
    client: str | None
    """None when authentication is off (anonymous)."""
    admin: bool
    key: str = ""
    """Who the call counts as for fair share and the stream limit (set by server.interceptors
    for inference calls: the client, a trusted metadata value, or the peer's address)."""


ANONYMOUS = Caller(None, True)

TOKEN = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
"""A header value gRPC carries as is: printable ASCII, and no spaces at the ends (they are stripped)."""

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
        """Raises ValueError naming what is wrong with the file (never the token itself)."""
        if path is None:
            return cls(None)
        try:
            entries = json.loads(Path(path).read_text(encoding="utf-8"))["tokens"]
            tokens = {token: Caller(entry["client"], entry.get("admin", False)) for token, entry in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: expected {{\"tokens\": {{TOKEN: {{\"client\": NAME}}}}}} ({exc!r})") from None
        for n, (token, caller) in enumerate(tokens.items(), 1):
            if not TOKEN.fullmatch(token):
                raise ValueError(f"{path}: token #{n} cannot be sent as gRPC metadata (it must be printable "
                                 "ASCII without spaces at either end)")
            if not isinstance(caller.client, str) or not caller.client or not isinstance(caller.admin, bool):
                raise ValueError(f"{path}: token #{n} needs a non-empty \"client\" and a true/false \"admin\"")
        return cls(tokens)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        if self._tokens is None:
            return ANONYMOUS
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise Unauthenticated("send 'authorization: Bearer TOKEN' metadata")
        token = header.removeprefix("Bearer ").strip()
        # No known token looks otherwise (from_file checks), and compare_digest refuses non-ASCII text.
        if not TOKEN.fullmatch(token):
            raise Unauthenticated("unknown bearer token")
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
