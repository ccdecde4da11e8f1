"""A stand-in for the engine's adapter moves (scheduler.tiers.TierEngine), for torch-free tests.

Weights are names in two sets, so tests can compare where the engine holds each adapter
with where the books say it is. Subclasses decide how a read behaves.
"""

from __future__ import annotations


class WeightsRecorder:
    def __init__(self):
        self.ram: set = set()
        self.vram: set = set()

    def attached_bytes(self, adapter):
        return self.bytes_once_read(adapter)

    async def attach(self, adapter):
        self.ram.remove(adapter)
        self.vram.add(adapter)

    async def demote(self, adapter):
        self.vram.remove(adapter)
        self.ram.add(adapter)

    async def detach(self, adapter):
        self.vram.remove(adapter)

    def drop(self, adapter):
        self.ram.remove(adapter)
