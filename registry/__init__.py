"""The adapter registry: a versioned store of PEFT adapters with passports (no torch here)."""
