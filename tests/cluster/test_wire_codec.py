"""The engine socket's codec: registered types round-trip, nothing else crosses, bad frames are CodecErrors."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accordion.cluster.errors import EngineOverloadedError, EngineUnavailableError, RequestTooLargeError
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import EngineOutput, RequestMoved, RequestTimings, TokenLogprobs, to_wire
from accordion.cluster.request import FinishReason, Request, RequestValidationError, SamplingParams
from accordion.cluster.wire_codec import (
    MAX_FRAME_BYTES,
    CodecError,
    decode_payload,
    encode_frame,
    frame_length,
)


def roundtrip(msg):
    frame = encode_frame(msg)
    n = frame_length(frame[:4])
    assert n == len(frame) - 4
    return decode_payload(frame[4:])


def test_submission_and_step_round_trip():
    req = Request(request_id="r-0", prompt_token_ids=[1, 2, 3], eos_token_ids=(2, 7), priority=-3,
                  sampling_params=SamplingParams(max_tokens=9, temperature=0.5, stop=["\n\n"], seed=11, logprobs=2))
    assert roundtrip(("submit", 4, [[req]])) == ("submit", 4, [[req]])
    outs = to_wire([
        EngineOutput("r-0", [5], num_prompt_tokens=3),
        EngineOutput("r-1", [6], [TokenLogprobs(6, -0.25, [(6, -0.25), (9, -2.0)])], FinishReason.STOP,
                     stop_token_id=2, num_prompt_tokens=4, timings=RequestTimings(0.001, 0.02, 0.3)),
        EngineOutput("r-2", [], finish_reason=FinishReason.ERROR, error="boom"),
        RequestMoved("r-3", "instance-1"),
    ])
    load = LoadReport("instance-0", num_running=3, kv_usage=0.25, spills=(("r-4", 16, 32),))
    kind, got, got_load = roundtrip(("step", outs, load))
    assert (kind, got, got_load) == ("step", outs, load)
    assert type(got[0]) is tuple and type(got[1].finish_reason) is FinishReason


@pytest.mark.parametrize("err", [EngineOverloadedError("queue full", 2.5), RequestTooLargeError("prompt", "too long"),
                                 RequestValidationError("top_p", "must be in (0, 1]"), EngineUnavailableError("draining")])
def test_typed_errors_keep_type_message_and_fields(err):
    _, _, [got] = roundtrip(("reply", 1, [err]))
    assert type(got) is type(err) and str(got) == str(err)
    assert getattr(got, "retry_after_s", None) == getattr(err, "retry_after_s", None)
    assert getattr(got, "field", None) == getattr(err, "field", None)


def test_unregistered_types_do_not_encode():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for obj in (Evil(), ValueError("x"), {1, 2}, 1j):
        with pytest.raises(TypeError):
            encode_frame(("step", [obj], None))


def test_unknown_tags_and_oversized_frames_are_refused():
    bad_ext = msgpack.packb(["step", msgpack.ExtType(99, b"\x90")], use_bin_type=True)
    with pytest.raises(CodecError):
        decode_payload(bad_ext)
    unknown_class = msgpack.packb(msgpack.ExtType(2, msgpack.packb(["Popen", {"args": ["sh"]}])), use_bin_type=True)
    with pytest.raises(CodecError):
        decode_payload(unknown_class)
    with pytest.raises(CodecError):
        frame_length((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_ever_raise_codec_errors(data):
    try:
        decode_payload(data)
    except CodecError:
        pass
