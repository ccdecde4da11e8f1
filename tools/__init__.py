"""Operator tools outside the contract: benchmark, soak and load generators."""
