"""`loraserve serve`: run the gRPC server (also `python -m loraserve.server.cli serve ...`).

The `loraserve` command itself (tools/cli.py) adds the demo, client, registry and bench
subcommands; this module imports none of them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from loraserve.server import settings


def try_it_line(host: str, port: int, adapter: str) -> str:
    """The one line that tells a newcomer how to call the server that just turned SERVING: the
    client CLI (bash's $'...' carries the prompt's newline) and grpcurl (reflection is on)."""
    target = f"{'localhost' if host in ('0.0.0.0', '::', '127.0.0.1') else host}:{port}"
    prompt = "Question: What should I do next?\\nAnswer:"
    body = f'{{"adapter_id":"{adapter}","prompt":"{prompt}"}}'
    return (f"ready: try `loraserve generate --target {target} --adapter {adapter} $'{prompt}'` or "
            f"`grpcurl -plaintext -d '{body}' {target} loraserve.v1.InferenceService/Generate`")


def http_try_line(host: str, port: int, adapter: str) -> str:
    """The same for the OpenAI-compatible HTTP front (said before the ready line, which stays last)."""
    target = f"{'localhost' if host in ('', '0.0.0.0', '::', '127.0.0.1') else host}:{port}"
    body = f'{{"model":"{adapter}","prompt":"Question: What should I do next?\\nAnswer:","max_tokens":24}}'
    return (f"openai: try `curl -s http://{target}/v1/completions -H 'content-type: application/json' "
            f"-d '{body}'` (or any OpenAI client with base_url http://{target}/v1)")


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = settings.from_args(args)
        cfg.check_paths()
    except ValueError as exc:
        print(f"loraserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.telemetry.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from loraserve.server.app import LoraServer

    log = logging.getLogger("loraserve")

    async def main() -> int:
        server = LoraServer(cfg)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await server.start()
        loader = asyncio.create_task(server.load())

        def loaded(task: asyncio.Task) -> None:
            if task.cancelled():
                return
            if (exc := task.exception()) is not None:
                # Retrieving the exception silences asyncio's own report: say it here, then stop,
                # so a failed start-up exits non-zero instead of idling NOT_SERVING.
                log.error("start-up failed, shutting down: %s", exc, exc_info=exc)
                stopping.set()
                return
            fronts, example = cfg.fronts, server.registry.example_id()
            if server.http_port:
                print(http_try_line(fronts.http_host or fronts.host, server.http_port, example), file=sys.stderr,
                      flush=True)
            print(try_it_line(fronts.host, server.port, example), file=sys.stderr, flush=True)

        loader.add_done_callback(loaded)
        await stopping.wait()
        failed = loader.done() and not loader.cancelled() and loader.exception() is not None
        if not failed:
            log.info("signal received: draining")
        if not loader.done():
            loader.cancel()
        await server.stop()
        return 1 if failed else 0

    return asyncio.run(main())


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="run the gRPC server (and its OpenAI-compatible HTTP front)")
    settings.add_arguments(serve)
    serve.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.server.cli")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
