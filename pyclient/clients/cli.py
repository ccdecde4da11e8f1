"""`loraserve generate --adapter legal "prompt" [--stream]`; `loraserve-client generate ...` where only
the client is installed, and `loraserve-client tokenize|models`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from loraserve.clients.client import LoraServeClient, RequestFailed
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
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message, rendered with the base model's chat template")
    p.add_argument("--system", help="a system message before it (implies --chat)")
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float)
    p.add_argument("--truncate-input-tokens", type=int, default=0, help="keep only the prompt's last N tokens")
    p.add_argument("--logprobs", type=int, help="each generated token's logprob and N alternatives (with --json)")
    p.add_argument("--n", type=int, default=0, help="completions to generate (not with --stream)")
    p.add_argument("--json-schema", help="constrain the output to JSON valid under this schema (JSON text)")
    p.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds [60]")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=args.stop, min_new_tokens=args.min_new_tokens,
                  repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                  frequency_penalty=args.frequency_penalty, truncate_input_tokens=args.truncate_input_tokens,
                  logprobs=args.logprobs, n=args.n, json_schema=args.json_schema, json_object=args.json_object)
    if args.chat or args.system:
        params["messages"] = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
        args.prompt = ""
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
                    print("\n".join(c.text for c in result.choices) if result.choices else result.text)
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


def add_tokenize_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="the base model's token ids (and spans) for a text")
    p.add_argument("text")
    p.add_argument("--chat", action="store_true", help="tokenize the text as a user message, rendered")
    p.add_argument("--target", default="localhost:50051", help="server address [localhost:50051]")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds [60]")
    p.set_defaults(func=lambda args: _print(lambda c: c.tokenize(
        "" if args.chat else args.text, [("user", args.text)] if args.chat else None), args))


def add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="the base model and the adapters this caller may use")
    p.add_argument("--target", default="localhost:50051", help="server address [localhost:50051]")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds [60]")
    p.set_defaults(func=lambda args: _print(lambda c: c.list_models(), args))


def _print(call, args: argparse.Namespace) -> int:
    """One call's answer as JSON."""
    with LoraServeClient(args.target, timeout=args.timeout) as client:
        try:
            print(json.dumps(asdict(call(client))))
        except RequestFailed as exc:
            print(f"error: {exc.code.name} ({exc.reason}): {exc.message}", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve-client", description="call a running loraserve server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_tokenize_parser(sub)
    add_models_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
