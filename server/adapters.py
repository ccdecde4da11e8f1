"""Adapter ids -> adapter directories. Ids are validated names, never paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

from scheduler.errors import AdapterNotFound, InvalidArgument
from scheduler.types import BASE, BASE_ADAPTER_ID, AdapterRef

# A name, optionally pinned to a version: "legal" or "legal@3". No '/', no "..".
ADAPTER_ID = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,63})(?:@(?P<version>[0-9]{1,9}))?$")


class AdapterStore:
    """One PEFT directory per adapter under `root`; metadata.json (optional) gives its version.

    The directory is read on every resolve, so an adapter copied in is served
    without a restart.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def resolve(self, adapter_id: str) -> AdapterRef:
        if not adapter_id:
            raise InvalidArgument("adapter_id", "is required (an adapter id, or 'base' for the bare model)")
        if adapter_id == BASE_ADAPTER_ID:
            return BASE
        match = ADAPTER_ID.match(adapter_id)
        if not match:
            raise InvalidArgument("adapter_id", "must be a name of letters, digits, '-' or '_' with an "
                                                "optional '@VERSION' (paths are not accepted)")
        name, wanted = match["name"], match["version"]
        path = self.root / name
        if not (path / "adapter_config.json").is_file():
            raise AdapterNotFound(adapter_id)
        version = self._version(path)
        if wanted is not None and wanted != version:
            raise AdapterNotFound(adapter_id)
        return AdapterRef(name, version, str(path))

    def ids(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/adapter_config.json"))

    @staticmethod
    def _version(path: Path) -> str:
        meta = path / "metadata.json"
        if meta.is_file():
            return str(json.loads(meta.read_text()).get("version", "1"))
        return "1"
