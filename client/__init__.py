"""``accordion.client``: a light gRPC client for ``accordion.v1.LLMService`` (grpc + accordion.protos only)."""

from accordion.client.cli import generate_cli
from accordion.client.client import (
    AsyncClient,
    Chunk,
    Client,
    ClientError,
    Completion,
    GenerateResult,
    TLSConfig,
    Timings,
    Usage,
    build_generate_request,
)

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "ClientError",
    "Completion",
    "GenerateResult",
    "TLSConfig",
    "Timings",
    "Usage",
    "build_generate_request",
    "generate_cli",
]
