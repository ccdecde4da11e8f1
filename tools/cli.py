"""`loraserve`: serve, demo build, generate, adapters, bench, soak.

The top of the import graph: each room adds its own subcommands (server.cli: serve;
clients.cli: generate; registry.cli: adapters, handed the runner's smoke test from here;
tools.bench: bench, soak), so none of them imports another's command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

from loraserve.clients.cli import add_generate_parser
from loraserve.registry.cli import add_adapters_parser
from loraserve.server.cli import add_serve_parser
from loraserve.tools.bench.cli import add_bench_parser
from loraserve.tools.bench.soak import add_soak_parser


def quiet_third_party() -> None:
    """Silence what the libraries say that is not the user's concern: transformers' and peft's
    deprecation notices (FutureWarning: is_gradient_checkpointing ...), weight-loading bars,
    advisory log lines. Our own logging and real errors are untouched."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|torch|bitsandbytes)(\.|$)")
    for name in ("transformers", "peft", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _smoke_tester(model_path: Path, prompts: tuple[str, ...] | None):
    from loraserve.runner.smoke import PROMPTS, SmokeTester  # torch: only when a smoke test runs

    return SmokeTester(model_path, prompts or PROMPTS)


def _run_cases(model_path: Path, store: str, s3_endpoint_url: str | None, target: str | None, sides: dict,
               cases: list) -> dict:
    import asyncio

    from loraserve.tools.evaluate import answers, in_process  # torch: only when the cases run here

    return asyncio.run(answers(target, sides, cases) if target else
                       in_process(model_path, store, s3_endpoint_url, sides, cases))


def summary_text(summary: dict) -> str:
    """loraserve.runner.demo's summary as a person reads it."""
    losses = ", ".join(f"{name} {loss:.2f}" for name, loss in summary["adapter_losses"].items())
    names = ", ".join(summary["adapter_losses"])
    return "\n".join([
        f"demo built in {summary['seconds']:.0f} s",
        f"  base model  {summary['base']}  (training loss {summary['base_loss']:.2f})",
        f"  adapters    {names} in {summary['adapters']}: registered, smoke-tested, promoted "
        f"(training loss {losses})",
        f"next: loraserve serve --model-path {summary['base']} --adapters-dir {summary['adapters']}   "
        f"(or `make serve`)",
    ])


def _demo_build(args: argparse.Namespace) -> int:
    from loraserve.runner.demo import build_demo
    from loraserve.tools.progress import StageBars

    out = Path(args.out)
    if (out / "adapters" / "registry.json").exists() and not args.force:
        print(f"demo already built in {out} (use --force to rebuild)")
        return 0
    shutil.rmtree(out, ignore_errors=True)
    print(f"building the demo into {out}: a tokenizer, a small Llama base and its LoRA adapters, "
          "trained here (nothing is downloaded)", file=sys.stderr)
    summary = build_demo(out, progress=StageBars())
    print(json.dumps(summary, indent=2) if args.json else summary_text(summary))
    return 0


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the embedded demo model")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_sub.add_parser("build", help="train the demo base model and adapters (no downloads)")
    build.add_argument("--out", default="var/demo", help="output directory [var/demo]")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.add_argument("--json", action="store_true", help="print the summary as JSON")
    build.set_defaults(func=_demo_build)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree (tests/test_docs.py reads it to check the commands the docs show)."""
    parser = argparse.ArgumentParser(prog="loraserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_demo_parser(sub)
    add_generate_parser(sub)
    add_adapters_parser(sub, smoke=_smoke_tester, run_cases=_run_cases)
    add_bench_parser(sub)
    add_soak_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
