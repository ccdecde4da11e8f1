"""`loraserve generate --adapter legal "prompt" [--stream]`; `loraserve-client generate ...` where only
the client is installed."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from clients.client import LoraServeClient, RequestFailed
from loraserve.contract import versioned


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="send one Generate request to a running server")
    p.add_argument("prompt")
    p.add_argument("--adapter", required=True, help="adapter id or alias; 'base' for the bare model")
    p.add_argument("--target", default="localhost:50051", help="server address [localhost:50051]")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds [60]")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=args.stop)
    with LoraServeClient(args.target, timeout=args.timeout) as client:
        try:
            if args.stream:
                for item in client.stream(args.adapter, args.prompt, **params):
                    if isinstance(item, str):
                        if not args.json:
                            print(item, end="", flush=True)
                    else:
                        result = item
                if not args.json:
                    print()
            else:
                result = client.generate(args.adapter, args.prompt, **params)
                if not args.json:
                    print(result.text)
        except RequestFailed as exc:
            detail = f" ({exc.reason})" if exc.reason else ""
            print(f"error: {exc.code.name}{detail}: {exc.message}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"[{versioned(result.adapter_id, result.adapter_version)} from {result.load_source}, "
              f"{result.output_tokens} tokens, {result.finish_reason}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraserve-client", description="call a running loraserve server")
    add_generate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
