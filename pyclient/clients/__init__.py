"""Typed Python clients (sync and asyncio) and the `loraserve generate` CLI."""

from loraserve.clients.client import (AsyncLoraServeClient, Choice, GenerateResult, LoraServeClient, Models, RequestFailed,
                            ServedModel, Tokenized, TokenLogprob)

__all__ = ["AsyncLoraServeClient", "Choice", "GenerateResult", "LoraServeClient", "Models", "RequestFailed",
           "ServedModel", "Tokenized", "TokenLogprob"]
