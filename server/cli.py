"""`loraserve` command: serve, demo build, generate, adapters."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import sys
from pathlib import Path

from server import config as config_mod


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.from_args(args)
        cfg.check_paths()
    except ValueError as exc:
        print(f"loraserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from server.app import LoraServer

    async def main() -> None:
        server = LoraServer(cfg)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await server.start()
        loader = asyncio.create_task(server.load())
        await stopping.wait()
        logging.getLogger("loraserve").info("signal received: draining")
        if not loader.done():
            loader.cancel()
        await server.stop()

    asyncio.run(main())
    return 0


def _demo_build(args: argparse.Namespace) -> int:
    from runner.demo import build_demo

    out = Path(args.out)
    if (out / "adapters" / "registry.json").exists() and not args.force:
        print(f"demo already built in {out} (use --force to rebuild)")
        return 0
    shutil.rmtree(out, ignore_errors=True)
    summary = build_demo(out)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    config_mod.add_arguments(serve)
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="the embedded demo model")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_sub.add_parser("build", help="train the demo base model and adapters (no downloads)")
    build.add_argument("--out", default="var/demo", help="output directory [var/demo]")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(func=_demo_build)

    from clients.cli import add_generate_parser
    from tools.bench.cli import add_bench_parser
    from tools.bench.soak import add_soak_parser
    from registry.cli import add_adapters_parser

    add_generate_parser(sub)
    add_adapters_parser(sub)
    add_bench_parser(sub)
    add_soak_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
