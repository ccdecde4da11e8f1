"""`loraserve adapters ...`: list, show, register, promote, rollback, archive, stale, reindex."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from registry.passport import STATUSES, Passport
from registry.store import Store, StoreError

COLUMNS = ("name", "version", "status", "aliases", "task", "client", "base_model", "created", "smoke")


def _row(p: Passport) -> dict:
    return {"name": p.name, "version": p.version, "status": p.status, "aliases": ",".join(p.aliases),
            "task": p.task, "client": p.client, "base_model": p.base_model, "created": p.created[:10],
            "smoke": "-" if p.smoke_test is None else ("passed" if p.smoke_test.passed else "FAILED")}


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _emit(args, passports: list[Passport]) -> None:
    if args.json:
        print(json.dumps([p.to_dict() for p in passports], indent=2))
    else:
        print(_table([_row(p) for p in passports]))


def _list(args, store: Store) -> int:
    found = [p for p in store.scan().passports
             if (args.client is None or p.client == args.client)
             and (args.status is None or p.status == args.status)
             and (args.base is None or args.base in (p.base_model, p.base_model_revision))]
    _emit(args, found)
    return 0


def _show(args, store: Store) -> int:
    name, _, version = args.adapter.partition("@")
    snap = store.scan()
    name = snap.aliases().get(name, name)
    p = snap.get(name, version) if version else (snap.active(name) or (snap.versions(name) or [None])[-1])
    if p is None:
        raise StoreError(f"{args.adapter} is not in the store")
    print(json.dumps(p.to_dict(), indent=2))
    return 0


def _register(args, store: Store) -> int:
    from registry.identity import base_identity
    from runner.smoke import PROMPTS, SmokeTester

    store.root.mkdir(parents=True, exist_ok=True)
    tester = SmokeTester(args.model_path, tuple(args.smoke_prompt or PROMPTS))
    p = store.register(
        Path(args.path), args.name, base_identity(args.model_path), tester, task=args.task, client=args.client,
        language=args.language, description=args.description, constraints=args.constraints,
        allowed_clients=_split(args.allowed_clients), fallback=args.fallback, aliases=_split(args.aliases))
    _emit(args, [p])
    if not p.smoke_test.passed:
        print(f"smoke test failed: {p.smoke_test.error}; {p.key} is recorded as failed and cannot be promoted",
              file=sys.stderr)
        return 1
    return 0


def _split(raw: str | None) -> list[str]:
    return [x.strip() for x in (raw or "").split(",") if x.strip()]


def _promote(args, store: Store) -> int:
    _emit(args, [store.promote(args.name, args.version)])
    return 0


def _rollback(args, store: Store) -> int:
    _emit(args, [store.rollback(args.name)])
    return 0


def _archive(args, store: Store) -> int:
    _emit(args, store.archive(args.name))
    return 0


def _stale(args, store: Store) -> int:
    _emit(args, store.stale(args.days))
    return 0


def _reindex(args, store: Store) -> int:
    _emit(args, list(store.reindex().passports))
    return 0


def add_adapters_parser(sub) -> None:
    p = sub.add_parser("adapters", help="the adapter registry (store of versioned adapters)")
    p.add_argument("--store", type=Path, default=Path(os.environ.get("LORASERVE_ADAPTERS_DIR", "var/demo/adapters")),
                   help="store directory [env LORASERVE_ADAPTERS_DIR; var/demo/adapters]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    cmds = p.add_subparsers(dest="adapters_command", required=True)

    ls = cmds.add_parser("list", help="list versions")
    ls.add_argument("--client")
    ls.add_argument("--status", choices=STATUSES)
    ls.add_argument("--base", help="base model id or revision")
    ls.set_defaults(run=_list)

    show = cmds.add_parser("show", help="one passport (NAME = the active version, or NAME@VERSION)")
    show.add_argument("adapter")
    show.set_defaults(run=_show)

    reg = cmds.add_parser("register", help="add a PEFT adapter directory as the next version (smoke-tested)")
    reg.add_argument("path", help="directory with adapter_config.json and adapter_model.safetensors")
    reg.add_argument("--name", required=True)
    reg.add_argument("--model-path", type=Path,
                     default=Path(os.environ.get("LORASERVE_MODEL_PATH", "var/demo/base")),
                     help="the base model it must fit [env LORASERVE_MODEL_PATH; var/demo/base]")
    for field in ("task", "client", "language", "description", "constraints"):
        reg.add_argument(f"--{field}", default="")
    reg.add_argument("--allowed-clients", help="comma-separated; default: every client")
    reg.add_argument("--fallback", choices=("fail", "base"), default="fail")
    reg.add_argument("--aliases", help="comma-separated names that follow the active version")
    reg.add_argument("--smoke-prompt", action="append", help="prompt for the smoke test (repeatable)")
    reg.set_defaults(run=_register)

    promote = cmds.add_parser("promote", help="make a version active (the previous one is archived)")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.set_defaults(run=_promote)

    rollback = cmds.add_parser("rollback", help="re-activate the previously active version")
    rollback.add_argument("name")
    rollback.set_defaults(run=_rollback)

    archive = cmds.add_parser("archive", help="take every version of an adapter out of service")
    archive.add_argument("name")
    archive.set_defaults(run=_archive)

    stale = cmds.add_parser("stale", help="inactive versions older than N days")
    stale.add_argument("--days", type=int, default=90)
    stale.set_defaults(run=_stale)

    reindex = cmds.add_parser("reindex", help="rebuild registry.json after editing the store by hand")
    reindex.set_defaults(run=_reindex)

    p.set_defaults(func=run_adapters)


def run_adapters(args: argparse.Namespace) -> int:
    try:
        return args.run(args, Store(args.store))
    except (StoreError, ValueError) as exc:
        print(f"loraserve adapters: {exc}", file=sys.stderr)
        return 1
