"""Adapter affinity over several replicas with gRPC's own ring_hash load balancing.

Each call's `x-adapter-id` metadata is hashed onto a ring of the replicas, so every request
for one adapter lands on the same replica (whose cache then holds it) and adapters spread
over all replicas; when a replica goes away only its adapters move. This is gRPC's
ring_hash policy hashing a request header (gRFC A76), no service mesh needed:

    target, options = replicas("10.0.0.1:50051", "10.0.0.2:50051")
    client = LoraServeClient(target, options=options)

On Kubernetes, `headless(...)` does the same over a headless Service's pods. Behind an L7 proxy
instead (Envoy, nginx; deploy/kubernetes/envoy), hash on the same header there.
"""

from __future__ import annotations

import json
import os

from loraserve.contract import ROUTING_HEADER

# Until gRPC turns it on by default, hashing on a header is behind this switch; it is read
# when a channel parses its service config, so setting it here (before any such channel) works.
_SWITCH = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"


def replicas(*addresses: str, min_ring_size: int = 1024) -> tuple[str, list[tuple[str, str]]]:
    """A channel target over `addresses` (host:port, IPv4 literals) and the options that route
    by adapter."""
    return "ipv4:" + ",".join(addresses), _by_adapter(min_ring_size)


def headless(service: str, min_ring_size: int = 1024) -> tuple[str, list[tuple[str, str]]]:
    """A channel target over every address DNS gives for `service` (host:port), e.g. a Kubernetes
    headless Service (`loraserve-headless.loraserve.svc.cluster.local:50051`), and the options that
    route by adapter. gRPC resolves the name again only when a connection is lost, so replicas
    added later get no calls from this channel until then (docs/operations.md "Kubernetes")."""
    return f"dns:///{service}", _by_adapter(min_ring_size)


def _by_adapter(min_ring_size: int) -> list[tuple[str, str]]:
    os.environ.setdefault(_SWITCH, "true")
    config = {"loadBalancingConfig": [{"ring_hash_experimental": {
        "requestHashHeader": ROUTING_HEADER, "minRingSize": min_ring_size}}]}
    return [("grpc.service_config", json.dumps(config))]
