"""Pure asyncio scheduling: queue, adapter grouping, batch policy. No torch here."""
