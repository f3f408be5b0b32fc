"""Errors the control plane raises toward the front end. The gRPC layer maps each to one status code.

:func:`short_error` gives any exception as one short line, for logs."""

from __future__ import annotations

from accordion.cluster.request import RequestValidationError

__all__ = [
    "RequestValidationError",
    "EngineOverloadedError",
    "EngineUnavailableError",
    "ModelNotFoundError",
    "RequestTooLargeError",
    "short_error",
]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (gRPC RESOURCE_EXHAUSTED with a retry hint)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # picklable with its retry hint (it crosses Ray)
        return (type(self), (str(self), self.retry_after_s))


class EngineUnavailableError(RuntimeError):
    """Not ready yet, draining, or no instance alive (gRPC UNAVAILABLE)."""


class ModelNotFoundError(LookupError):
    """The request names a model this server does not serve (gRPC NOT_FOUND)."""


class RequestTooLargeError(RequestValidationError):
    """The request can never fit: prompt plus max_tokens over max_model_len or over the KV pool."""


def short_error(e: BaseException, limit: int = 300) -> str:
    """``Type: message``, its first line, at most ``limit`` characters."""
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:limit]
