"""The import graph reads top-down: each room imports only the rooms below it, and the client
distribution only the contract, grpc and protobuf. Every import counts, lazy ones in functions too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import REPO

ROOMS = {"tools": REPO / "tools", "server": REPO / "server", "runner": REPO / "runner",
         "scheduler": REPO / "scheduler", "registry": REPO / "registry",
         "clients": REPO / "pyclient" / "clients", "loraserve": REPO / "pyclient" / "loraserve"}
BELOW = {
    "tools": {"server", "runner", "scheduler", "registry", "clients", "loraserve"},
    "server": {"runner", "scheduler", "registry", "loraserve"},
    "runner": {"scheduler", "registry", "loraserve"},
    "scheduler": {"loraserve"},
    "registry": {"loraserve"},
    "clients": {"loraserve"},
    "loraserve": set(),
}
TORCH = {"torch", "transformers", "peft", "bitsandbytes", "tokenizers", "accelerate"}
TORCH_FREE = ("scheduler", "registry", "clients", "loraserve")
CLIENT_DISTRIBUTION = ("clients", "loraserve")
"""What `pip install ./pyclient` has: grpcio, grpcio-status (google.rpc) and protobuf."""


def _imports(room: str) -> dict[str, set[str]]:
    """file -> top-level modules it imports."""
    found = {}
    for path in sorted(ROOMS[room].rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_allowed_edges_have_an_order_top_down():
    order = list(BELOW)
    assert all(order.index(low) > order.index(high) for high, lows in BELOW.items() for low in lows)


def test_each_room_imports_only_rooms_below_it():
    wrong = [f"{path} imports {name}" for room in ROOMS for path, names in _imports(room).items()
             for name in names if name in ROOMS and name != room and name not in BELOW[room]]
    assert not wrong, wrong


def test_torch_stays_out_of_the_scheduler_registry_and_client_distribution():
    wrong = [f"{path} imports {name}" for room in TORCH_FREE for path, names in _imports(room).items()
             for name in names & TORCH]
    assert not wrong, wrong


def test_the_client_distribution_needs_only_grpc_and_protobuf():
    allowed = set(sys.stdlib_module_names) | {"grpc", "google", "__future__", *CLIENT_DISTRIBUTION}
    wrong = [f"{path} imports {name}" for room in CLIENT_DISTRIBUTION for path, names in _imports(room).items()
             for name in names - allowed]
    assert not wrong, wrong
