"""A msgpack codec for the messages between a front end and an engine process over a socket (never pickle).

Plain data (None, bool, int, float, str, bytes, lists, dicts with str keys) is msgpack's own; tuples come back as
tuples. On top of it, only the types registered here cross: the request and output dataclasses (as their field
values, rebuilt with the constructor), their enums (by value) and the typed errors a submission may be refused
with (by their constructor's arguments). Anything else fails to encode, and an unknown tag fails to decode: a
peer can send data, never code. Frames are a 4-byte big-endian length and the payload, at most :data:`MAX_FRAME_BYTES`.
"""

from __future__ import annotations

import dataclasses
import struct

import msgpack

from accordion.cluster.errors import EngineOverloadedError, EngineUnavailableError, RequestTooLargeError
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import EngineOutput, RequestMoved, RequestTimings, TokenLogprobs
from accordion.cluster.request import FinishReason, Request, RequestStatus, RequestValidationError, SamplingParams

MAX_FRAME_BYTES = 64 << 20
HEADER = struct.Struct(">I")

_TUPLE, _DATACLASS, _ENUM, _ERROR = 1, 2, 3, 4
DATACLASSES = {c.__name__: c for c in (Request, SamplingParams, EngineOutput, TokenLogprobs, RequestTimings,
                                       RequestMoved, LoadReport)}
ENUMS = {c.__name__: c for c in (FinishReason, RequestStatus)}
ERRORS = {c.__name__: c for c in (RequestValidationError, RequestTooLargeError, EngineOverloadedError,
                                  EngineUnavailableError)}


class CodecError(ValueError):
    """A frame that is not a valid message (malformed, too large, an unknown type)."""


def _default(obj):
    t = type(obj)
    if t.__module__ == "numpy" and hasattr(obj, "item"):  # a numpy scalar that slipped into an output
        return obj.item()
    if t is tuple:
        return msgpack.ExtType(_TUPLE, _pack(list(obj)))
    if ENUMS.get(t.__name__) is t:
        return msgpack.ExtType(_ENUM, _pack([t.__name__, obj.value]))
    if DATACLASSES.get(t.__name__) is t:
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
        return msgpack.ExtType(_DATACLASS, _pack([t.__name__, values]))
    if ERRORS.get(t.__name__) is t:
        return msgpack.ExtType(_ERROR, _pack([t.__name__, list(obj.__reduce__()[1])]))  # its constructor's args
    raise TypeError(f"{t.__name__} does not cross the engine socket")


def _ext_hook(code: int, data: bytes):
    value = _unpack(data)
    if code == _TUPLE:
        return tuple(value)
    name, payload = value
    try:
        if code == _ENUM:
            return ENUMS[name](payload)
        if code == _DATACLASS:
            return DATACLASSES[name](**payload)
        if code == _ERROR:
            return ERRORS[name](*payload)
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"bad {name!r} in a frame: {e}") from None
    raise CodecError(f"unknown extension type {code} in a frame")


def _pack(obj) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True, use_list=True)


def encode_frame(message) -> bytes:
    """One frame: length header + msgpack payload."""
    payload = _pack(message)
    if len(payload) > MAX_FRAME_BYTES:
        raise CodecError(f"message of {len(payload)} bytes is over the {MAX_FRAME_BYTES}-byte frame limit")
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    """The payload length a header announces; raises :class:`CodecError` when it is over the limit."""
    (n,) = HEADER.unpack(header)
    if n > MAX_FRAME_BYTES:
        raise CodecError(f"frame of {n} bytes announced, over the {MAX_FRAME_BYTES}-byte limit")
    return n


def decode_payload(payload: bytes):
    """The message of one frame's payload; raises :class:`CodecError` on anything that is not one."""
    try:
        return _unpack(payload)
    except CodecError:
        raise
    except Exception as e:  # msgpack's own errors (truncated, extra data, bad types)
        raise CodecError(f"malformed frame: {type(e).__name__}: {e}") from None
