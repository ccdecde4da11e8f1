"""Typed Python clients (sync and asyncio) and the `loraserve generate` CLI."""

from clients.client import AsyncLoraServeClient, GenerateResult, LoraServeClient, RequestFailed

__all__ = ["AsyncLoraServeClient", "GenerateResult", "LoraServeClient", "RequestFailed"]
