"""`loraserve adapters ...`: list, show, register, evaluate, set-policy, promote, rollback, archive,
stale, reindex.

Also runnable alone, without torch or the server's imports: `python -m loraserve.registry.cli --store DIR ...`;
`register` then needs --no-smoke, since the smoke test runs the model, and `evaluate` is refused:
the `loraserve` command (tools/cli.py) hands them the runner's tester and the serving path's case
runner, so no import here runs back up to the runner or the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable

from loraserve.contract import BASE_ADAPTER_ID
from loraserve.registry.errors import StoreError
from loraserve.registry.evaluate import MIN_PASS_RATE, Case, Gate, GateState, judge, parse_test_set, pending, table
from loraserve.registry.location import DEFAULT_MODEL, DEFAULT_STORE, is_remote
from loraserve.registry.origin import open_store
from loraserve.registry.passport import Evaluation, Passport, Status
from loraserve.registry.rollout import KEYS, Canary, Limits, Shadow
from loraserve.registry.snapshot import now_iso
from loraserve.registry.store import Store

SmokeFactory = Callable[[Path, tuple[str, ...] | None], Callable]
"""(base model path, prompts or None for the default ones) -> a tester for Store.register."""
CaseRunner = Callable[..., dict]
"""(model_path, store, s3_endpoint_url, target: HOST:PORT or None for a server in process, sides:
side -> adapter id, cases) -> side -> one registry.evaluate.Answer per case."""

COLUMNS = ("name", "version", "status", "canary", "aliases", "task", "client", "base_model", "rank", "created",
           "trained", "smoke", "gate")
SORTS = {
    "name": lambda p: p.name, "version": lambda p: int(p.version), "status": lambda p: p.status,
    "client": lambda p: p.client, "task": lambda p: p.task, "rank": lambda p: p.rank,
    "created": lambda p: p.created, "trained": lambda p: p.trained, "promoted": lambda p: p.promoted_at or None,
}


def _row(p: Passport) -> dict:
    canary = "-" if p.canary is None else (f"{p.canary.percent:g}% {p.canary.key}" if p.canary.running
                                           else p.canary.state)
    if p.shadow is not None:
        canary = f"shadow {p.shadow.percent:g}%" + ("" if canary == "-" else f", {canary}")
    return {"name": p.name, "version": p.version, "status": p.status, "canary": canary, "aliases": ",".join(p.aliases),
            "task": p.task, "client": p.client, "base_model": p.base_model, "rank": p.rank,
            "created": p.created[:10], "trained": p.evaluation.trained_at[:10] or "-",
            "smoke": "-" if p.smoke_test is None else ("passed" if p.smoke_test.passed else "FAILED"),
            "gate": "-" if p.gate is None else p.gate.state}


def _sort_field(field: str):
    """A --sort value: a field of SORTS, or metric.NAME (an evaluation metric)."""
    if field.startswith("metric.") and len(field) > 7:
        return lambda p, metric=field[7:]: p.evaluation.metrics.get(metric)
    if field in SORTS:
        return SORTS[field]
    raise argparse.ArgumentTypeError(f"sort by one of {', '.join(SORTS)} or metric.NAME, not {field!r}")


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
    found = [p for p in store.snapshot().passports
             if (args.client is None or p.client == args.client)
             and (args.status is None or p.status == args.status)
             and (args.base is None or args.base in (p.base_model, p.base_model_revision))]
    if args.sort:  # versions without the value come last either way
        found = (sorted((p for p in found if args.sort(p) is not None), key=args.sort, reverse=args.reverse)
                 + [p for p in found if args.sort(p) is None])
    _emit(args, found)
    return 0


def _show(args, store: Store) -> int:
    p = store.snapshot().find(args.adapter)
    if p is None:
        raise StoreError(f"{args.adapter} is not in the store")
    print(json.dumps(p.to_dict(), indent=2))
    return 0


def _register(args, store: Store) -> int:
    from loraserve.registry.identity import base_identity

    # The adapter's test set (given, else the one its versions were gated on) is recorded pending
    # with the version, so a crash before the evaluation leaves it unpromotable.
    cases = _read_cases(args.test_set) if args.test_set else _adapter_cases(store.snapshot(), args.name)
    tester = None
    if not args.no_smoke:
        if args.smoke is None:
            raise StoreError("the smoke test runs the model: register with `loraserve adapters register`, "
                             "or pass --no-smoke")
        tester = args.smoke(args.model_path, tuple(args.smoke_prompt) if args.smoke_prompt else None)
    evaluation = Evaluation.from_dict(json.loads(args.evaluation.read_text())) if args.evaluation else None
    p = store.register(
        Path(args.path), args.name, base_identity(args.model_path), tester, evaluation=evaluation, task=args.task,
        client=args.client, language=args.language, description=args.description, constraints=args.constraints,
        change_policy=args.change_policy, gate=pending(cases, args.min_pass_rate) if cases else None,
        **_policy(args))
    del tester  # its engine: the evaluation starts a server of its own
    if p.failure:
        _emit(args, [p])
        print(f"{p.failure}; {p.key} is recorded as failed and cannot be promoted", file=sys.stderr)
        return 1
    if cases and not args.no_smoke:
        p = store.record_gate(p.name, p.version, _gate(args, store, p, cases, args.min_pass_rate))
    _emit(args, [p])
    if p.gate is not None and p.gate.state is not GateState.PASSED:
        print(f"{p.key} is staging and cannot be promoted: "
              + (p.gate.problem() if p.gate.state is GateState.FAILED else
                 f"run `loraserve adapters evaluate {p.name} {p.version}`"), file=sys.stderr)
        return 1 if p.gate.state is GateState.FAILED else 0
    return 0


def _read_cases(path: Path) -> list[Case]:
    return parse_test_set(path.read_text(), str(path))


def _adapter_cases(snap, name: str) -> list[Case] | None:
    """The adapter's test set: the one its newest gated version was given (None: it has none)."""
    gated = [p for p in snap.versions(name) if p.gate is not None]
    return gated[-1].gate.cases_to_run() if gated else None


def _gate(args, store: Store, p: Passport, cases: list[Case], min_pass_rate: float,
          target: str | None = None) -> Gate:
    """Run `cases` for `p`, its adapter's active version (unless that is `p`) and the base model."""
    if args.run_cases is None:
        raise StoreError("the evaluation runs the model: use `loraserve adapters` (or register with --no-smoke "
                         "and evaluate later)")
    active = store.snapshot().active(p.name)
    sides = {"candidate": p.key, **({"active": active.key} if active and active.key != p.key else {}),
             "base": BASE_ADAPTER_ID}
    answers = args.run_cases(model_path=args.model_path, store=args.store, s3_endpoint_url=args.s3_endpoint_url,
                             target=target, sides=sides, cases=cases)
    return judge(cases, sides, answers, min_pass_rate, now_iso(), target or "in-process")


def _evaluate(args, store: Store) -> int:
    snap = store.snapshot()
    p = snap.get(args.name, args.version)
    if p is None:
        raise StoreError(f"{args.name}@{args.version} is not in the store")
    if p.status in (Status.FAILED, Status.ARCHIVED):
        why = f" ({p.failure})" if p.failure else ""
        raise StoreError(f"{p.key} is {p.status}{why}; it cannot be served, so not evaluated")
    cases = _read_cases(args.test_set) if args.test_set else _adapter_cases(snap, args.name)
    if not cases:
        raise StoreError(f"{args.name} has no test set yet: give one with --test-set FILE")
    gate = _gate(args, store, p, cases, args.min_pass_rate, args.target)
    store.record_gate(p.name, p.version, gate)
    print(json.dumps(dataclasses.asdict(gate), indent=2) if args.json else table(gate))
    return 0 if gate.passed else 1


def _split(raw: str | None) -> list[str] | None:
    """A comma-separated flag; None when it was not given (the adapter's policy is kept)."""
    return None if raw is None else [x.strip() for x in raw.split(",") if x.strip()]


def _policy(args) -> dict:
    """The policy fields the command line gives (None: not given)."""
    return {"allowed_clients": [] if getattr(args, "all_clients", False) else _split(args.allowed_clients),
            "aliases": [] if getattr(args, "no_aliases", False) else _split(args.aliases),
            "fallback": args.fallback}


def _set_policy(args, store: Store) -> int:
    requested = _policy(args)
    if all(v is None for v in requested.values()):
        raise StoreError("say what to change: --allowed-clients/--all-clients, --aliases/--no-aliases or --fallback")
    _emit(args, store.set_policy(args.name, reason=args.reason, **requested))
    return 0


def _promote(args, store: Store) -> int:
    if args.canary is None:
        _emit(args, [store.promote(args.name, args.version, args.force)])
        return 0
    limits = Limits(max_error_rate=args.max_error_rate, max_ttft_p95_ratio=args.max_ttft_p95_ratio,
                    min_requests=args.min_requests, window_s=args.window_s)
    canary = Canary(percent=args.canary, started_at=now_iso(), key=args.canary_key, limits=limits)
    _emit(args, [store.canary(args.name, args.version, canary, args.force)])
    return 0


def _shadow(args, store: Store) -> int:
    shadow = Shadow(percent=args.percent, started_at=now_iso()) if args.percent else None
    _emit(args, [store.shadow(args.name, args.version, shadow)])
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


def _rate(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a pass rate is in [0, 1], not {raw}")
    return value


def _model_path_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--model-path", type=Path, default=Path(os.environ.get("LORASERVE_MODEL_PATH", DEFAULT_MODEL)),
                        help=f"{what} [env LORASERVE_MODEL_PATH; {DEFAULT_MODEL}]")


def add_adapters_parser(sub, smoke: SmokeFactory | None = None, run_cases: CaseRunner | None = None) -> None:
    p = sub.add_parser("adapters", help="the adapter registry (store of versioned adapters)")
    p.add_argument("--store", default=os.environ.get("LORASERVE_ADAPTERS_DIR", DEFAULT_STORE),
                   help=f"store directory, or s3://BUCKET/PREFIX [env LORASERVE_ADAPTERS_DIR; {DEFAULT_STORE}]")
    p.add_argument("--s3-endpoint-url", default=os.environ.get("LORASERVE_S3_ENDPOINT_URL") or None,
                   help="S3-compatible endpoint for an s3:// store (credentials: the standard AWS variables "
                        "and files) [env LORASERVE_S3_ENDPOINT_URL; AWS's]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    cmds = p.add_subparsers(dest="adapters_command", required=True)

    ls = cmds.add_parser("list", help="list versions")
    ls.add_argument("--client")
    ls.add_argument("--status", choices=[s.value for s in Status])
    ls.add_argument("--base", help="base model id or revision")
    ls.add_argument("--sort", type=_sort_field, metavar="FIELD",
                    help=f"order by {', '.join(SORTS)} or metric.NAME (an evaluation metric)")
    ls.add_argument("--reverse", action="store_true", help="largest (or latest) first")
    ls.set_defaults(run=_list)

    show = cmds.add_parser("show", help="one passport (NAME = the active version, or NAME@VERSION)")
    show.add_argument("adapter")
    show.set_defaults(run=_show)

    reg = cmds.add_parser("register", help="add a PEFT adapter directory as the next version (smoke-tested)")
    reg.add_argument("path", help="directory with adapter_config.json and adapter_model.safetensors")
    reg.add_argument("--name", required=True)
    _model_path_argument(reg, "the base model it must fit")
    for field in ("task", "client", "language", "description", "constraints"):
        reg.add_argument(f"--{field}", default="")
    reg.add_argument("--allowed-clients", help="comma-separated; a new adapter's default: every client; a new "
                                               "version inherits its adapter's")
    reg.add_argument("--fallback", choices=("fail", "base"), help="a new adapter's default: fail; a new version "
                                                                  "inherits its adapter's")
    reg.add_argument("--aliases", help="comma-separated names that follow the active version (a new version "
                                       "inherits its adapter's)")
    reg.add_argument("--change-policy", action="store_true",
                     help="let --allowed-clients/--aliases/--fallback change an existing adapter's policy, for "
                          "every version (otherwise a difference is refused)")
    reg.add_argument("--smoke-prompt", action="append", help="prompt for the smoke test (repeatable)")
    reg.add_argument("--no-smoke", action="store_true",
                     help="skip the smoke test (no torch; the version stays staging and cannot be promoted)")
    reg.add_argument("--evaluation", type=Path, metavar="JSON",
                     help="file with the passport's evaluation block: metrics, eval_set_size, evaluated_at, "
                          "dataset_sha256, training_config, trained_at, previous_version")
    reg.add_argument("--test-set", type=Path, metavar="JSONL",
                     help="evaluate the new version on this test set before it may be promoted (recorded: later "
                          "versions are gated on it too); default: the adapter's, if it has one")
    reg.add_argument("--min-pass-rate", type=_rate, default=MIN_PASS_RATE,
                     help="the candidate's pass rate the gate needs [%(default)s]")
    reg.set_defaults(run=_register)

    ev = cmds.add_parser("evaluate", help="run a test set for a version, its adapter's active version and the base "
                                          "model; record the gate in its passport; exit 1 if it fails")
    ev.add_argument("name")
    ev.add_argument("version")
    ev.add_argument("--test-set", type=Path, metavar="JSONL",
                    help="one case a line: prompt or messages, sampling, expect (contains, not_contains, regex, "
                         "equals, json_schema); default: the adapter's recorded test set")
    ev.add_argument("--min-pass-rate", type=_rate, default=MIN_PASS_RATE,
                    help="fail when the candidate passes fewer cases [%(default)s]; it fails anyway on a case "
                         "the active version passes")
    ev.add_argument("--target", metavar="HOST:PORT",
                    help="a running server on this store (plaintext gRPC); default: a server started here")
    _model_path_argument(ev, "the base model, for a server started here")
    ev.set_defaults(run=_evaluate)

    policy = cmds.add_parser("set-policy", help="change an adapter's access, aliases or fallback, for every "
                                                "version (recorded in its passports' policy_history)")
    policy.add_argument("name")
    access = policy.add_mutually_exclusive_group()
    access.add_argument("--allowed-clients", help="comma-separated: only these clients may use it")
    access.add_argument("--all-clients", action="store_true", help="every client may use it")
    names = policy.add_mutually_exclusive_group()
    names.add_argument("--aliases", help="comma-separated: its aliases from now on (replacing the old ones)")
    names.add_argument("--no-aliases", action="store_true", help="no aliases")
    policy.add_argument("--fallback", choices=("fail", "base"))
    policy.add_argument("--reason", default="", help="why, for the history")
    policy.set_defaults(run=_set_policy)

    promote = cmds.add_parser("promote", help="make a version active (the previous one is archived), or with "
                                              "--canary send it a share of the adapter's requests")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--canary", type=float, metavar="PCT",
                         help="send PCT%% of the requests naming NAME (or an alias) to VERSION, the rest to the "
                              "active version; promote without --canary completes it, rollback ends it")
    promote.add_argument("--canary-key", choices=KEYS, default="request",
                         help="split per request (default), or sticky per client")
    defaults = Limits()
    promote.add_argument("--max-error-rate", type=float, default=defaults.max_error_rate,
                         help="abort when the canary's error rate over the window is above this and above the "
                              "stable version's [%(default)s]")
    promote.add_argument("--max-ttft-p95-ratio", type=float, default=defaults.max_ttft_p95_ratio,
                         help="abort when the canary's time-to-first-token p95 is above this times the stable "
                              "version's [%(default)s]")
    promote.add_argument("--min-requests", type=int, default=defaults.min_requests,
                         help="requests each side needs in the window before it is judged [%(default)s]")
    promote.add_argument("--window-s", type=float, default=defaults.window_s,
                         help="the sliding window the figures are taken over [%(default)s]")
    promote.add_argument("--force", action="store_true",
                         help="promote even though its evaluation gate failed or is missing (recorded in its history)")
    promote.set_defaults(run=_promote)

    rollback = cmds.add_parser("rollback", help="end a running canary; else re-activate the previously active "
                                                "version")
    rollback.add_argument("name")
    rollback.set_defaults(run=_rollback)

    shadow = cmds.add_parser("shadow", help="run a share of the adapter's requests also on VERSION, in the "
                                            "background, comparing its answers with the served ones")
    shadow.add_argument("name")
    shadow.add_argument("version")
    shadow.add_argument("--percent", type=float, required=True,
                        help="share of the requests served by the active version to mirror; 0 ends it")
    shadow.set_defaults(run=_shadow)

    archive = cmds.add_parser("archive", help="take every version of an adapter out of service")
    archive.add_argument("name")
    archive.set_defaults(run=_archive)

    stale = cmds.add_parser("stale", help="inactive versions trained more than N days ago")
    stale.add_argument("--days", type=int, default=90)
    stale.set_defaults(run=_stale)

    reindex = cmds.add_parser("reindex", help="recover from interrupted writes; take passport edits into "
                                              "registry.json")
    reindex.set_defaults(run=_reindex)

    p.set_defaults(func=run_adapters, smoke=smoke, run_cases=run_cases)


def _open(args: argparse.Namespace):
    """A local store is recovered on opening (a crashed writer's leftovers); a bucket's index is
    only ever moved by conditional writes, so nothing needs finishing (`reindex` reconciles it)."""
    if is_remote(args.store):
        return open_store(args.store, endpoint_url=args.s3_endpoint_url)
    return Store.open(Path(args.store))


def run_adapters(args: argparse.Namespace) -> int:
    try:
        return args.run(args, _open(args))
    except (StoreError, ValueError, OSError) as exc:
        print(f"loraserve adapters: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.registry.cli")
    add_adapters_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["adapters", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
