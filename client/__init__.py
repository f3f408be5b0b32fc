"""``accordion.client``: a light gRPC client for ``accordion.v1.LLMService`` (grpc + accordion.protos only)."""

from accordion.client.cli import generate_cli
from accordion.client.client import AsyncClient, Client
from accordion.client.connection import TLSConfig
from accordion.client.request import build_generate_request
from accordion.client.results import Chunk, ClientError, Completion, GenerateResult, Timings, Usage

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
