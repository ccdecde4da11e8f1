"""gRPC transport: servicers, validation, error mapping, config and the CLI entry."""
