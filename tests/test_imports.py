"""The import graph reads top-down: each room imports only the rooms below it, and the client
distribution only the contract, grpc and protobuf. Every import counts, lazy ones in functions too."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO

ROOMS = {"tools": REPO / "tools", "server": REPO / "server", "runner": REPO / "runner",
         "scheduler": REPO / "scheduler", "registry": REPO / "registry",
         "clients": REPO / "pyclient" / "clients", "contract": REPO / "pyclient" / "loraserve"}
"""Each room installs as loraserve.<room>; the contract is loraserve itself (loraserve.v1, loraserve.contract)."""
BELOW = {
    "tools": {"server", "runner", "scheduler", "registry", "clients", "contract"},
    "server": {"runner", "scheduler", "registry", "contract"},
    "runner": {"scheduler", "registry", "contract"},
    "scheduler": {"contract"},
    "registry": {"contract"},
    "clients": {"contract"},
    "contract": set(),
}
TORCH = {"torch", "transformers", "peft", "bitsandbytes", "tokenizers", "accelerate"}
TORCH_FREE = ("scheduler", "registry", "clients", "contract")
CLIENT_DISTRIBUTION = ("clients", "contract")
"""What `pip install ./pyclient` has: grpcio, grpcio-status (google.rpc) and protobuf."""
ACYCLIC = ("registry", "tools")
"""Rooms whose modules import one another without a circle (a lazy import that closes one still counts)."""


def _room(module: str) -> str:
    """The room an absolute import names, or its top-level module when it is not loraserve's."""
    parts = module.split(".")
    if parts[0] != "loraserve":
        return f"bare {parts[0]}" if parts[0] in ROOMS else parts[0]
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "contract"


def _imports(room: str) -> dict[str, set[str]]:
    """file -> rooms and top-level modules it imports."""
    found = {}
    for path in sorted(ROOMS[room].rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {_room(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= ({_room(f"{node.module}.{a.name}") for a in node.names} if node.module == "loraserve"
                          else {_room(node.module)})
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_allowed_edges_have_an_order_top_down():
    order = list(BELOW)
    assert all(order.index(low) > order.index(high) for high, lows in BELOW.items() for low in lows)


def test_every_import_names_a_room_under_loraserve():
    """`from server.app import ...` would import a second copy of a room, or nothing once installed."""
    wrong = [f"{path} imports {name}" for room in ROOMS for path, names in _imports(room).items()
             for name in names if name.startswith("bare ")]
    tests = [f"{path.name} imports {node.module if isinstance(node, ast.ImportFrom) else node.names[0].name}"
             for path in sorted((REPO / "tests").glob("*.py"))
             for node in ast.walk(ast.parse(path.read_text(), str(path)))
             if isinstance(node, (ast.Import, ast.ImportFrom)) and _bare(node)]
    assert not wrong + tests, wrong + tests


def _bare(node: ast.Import | ast.ImportFrom) -> bool:
    names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else \
        [a.name for a in node.names] if isinstance(node, ast.Import) else []
    return any(_room(name).startswith("bare ") for name in names)


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


def _module_graph(room: str) -> dict[str, set[str]]:
    """module -> the modules of the same room it imports (`from a.b import c` counts a.b.c when c is a module)."""
    modules = {".".join(("loraserve", room, *path.relative_to(ROOMS[room]).with_suffix("").parts))
               .removesuffix(".__init__"): path for path in sorted(ROOMS[room].rglob("*.py"))}
    graph = {}
    for module, path in modules.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                named |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        graph[module] = {name for name in named if name in modules and name != module}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path from its smallest module back to that module."""
    found = set()

    def walk(path: list[str]) -> None:
        for nxt in graph[path[-1]]:
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt not in path and nxt > path[0]:
                walk(path + [nxt])

    for start in sorted(graph):
        walk([start])
    return [list(circle) + [circle[0]] for circle in sorted(found)]


def test_the_circle_finder_sees_a_lazy_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_within_the_registry_and_tools():
    circles = [" -> ".join(c) for room in ACYCLIC for c in _circles(_module_graph(room))]
    assert not circles, circles



def test_the_wheel_installs_one_import_name(tmp_path):
    """`pip install .` puts loraserve and nothing else at the top of site-packages (no generic `server`),
    with the contract and the clients inside: nothing it needs is missing from a package index."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = zipfile.ZipFile(next(tmp_path.glob("loraserve-*.whl")))
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names} == {"loraserve", "loraserve-0.1.0.dist-info"}, names
    assert {"loraserve/server/app.py", "loraserve/scheduler/scheduler.py", "loraserve/runner/engine.py",
            "loraserve/registry/store.py", "loraserve/tools/cli.py", "loraserve/clients/client.py",
            "loraserve/contract.py", "loraserve/v1/inference.proto"} <= set(names)
    metadata = wheel.read("loraserve-0.1.0.dist-info/METADATA").decode()
    assert "Requires-Dist: loraserve-client" not in metadata
    assert "loraserve = loraserve.tools.cli:main" in wheel.read("loraserve-0.1.0.dist-info/entry_points.txt").decode()

