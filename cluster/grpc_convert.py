"""Proto <-> control-plane conversion for the ``accordion.v1`` gRPC API, in exactly one place.

Nothing here touches gRPC itself: functions take and return protobuf messages and plain control-plane types
(:class:`SamplingParams`, :class:`StreamDelta`, :class:`ModelInfo`, :class:`ServerInfo`) and raise
:class:`RequestValidationError` for bad input, which the servicer maps to ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

from accordion.cluster.engine_client import ModelInfo, ServerInfo
from accordion.cluster.errors import RequestValidationError
from accordion.cluster.outputs import RequestTimings, StreamDelta, TokenLogprobs
from accordion.cluster.request import FinishReason, SamplingParams
from accordion.cluster.validation import check_max_tokens, check_prompt_room
from accordion.cluster.validation import validate_token_ids  # noqa: F401  (re-exported for the servicer)
from accordion.protos import llm_service_pb2 as pb

MAX_REQUEST_ID_CHARS = 256
MAX_CHAT_MESSAGES = 1024

# Scalars of accordion.v1.SamplingParams that map 1:1 onto SamplingParams fields of the same name.
_SAMPLING_SCALARS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "max_tokens",
    "min_tokens",
    "seed",
    "n",
    "ignore_eos",
    "logprobs",
    "skip_special_tokens",
    "include_stop_str_in_output",
)

_FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


def validate_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestValidationError("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    if not all(" " < c <= "~" for c in request_id):
        raise RequestValidationError("request_id", "only printable ASCII characters without spaces are allowed")


def chat_messages_to_dicts(msgs: pb.ChatMessages) -> tuple[list[dict[str, str]], bool]:
    if not msgs.messages:
        raise RequestValidationError("messages", "must contain at least one message")
    if len(msgs.messages) > MAX_CHAT_MESSAGES:
        raise RequestValidationError("messages", f"at most {MAX_CHAT_MESSAGES} messages, got {len(msgs.messages)}")
    out = []
    for i, m in enumerate(msgs.messages):
        if not m.role:
            raise RequestValidationError("messages", f"message {i} has an empty role")
        out.append({"role": m.role, "content": m.content})
    add_gen = msgs.add_generation_prompt if msgs.HasField("add_generation_prompt") else True
    return out, add_gen


def sampling_params_from_proto(sp: pb.SamplingParams, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Build validated :class:`SamplingParams`; unset scalars keep the server defaults.

    ``max_tokens`` unset means "whatever fits": ``max_model_len - prompt_len``. A prompt that leaves no room, or
    an explicit ``max_tokens`` that does not fit, raises :class:`RequestTooLargeError`.
    """
    room = check_prompt_room(prompt_len, max_model_len)
    kwargs: dict = {name: getattr(sp, name) for name in _SAMPLING_SCALARS if sp.HasField(name)}
    if "max_tokens" not in kwargs:
        kwargs["max_tokens"] = room
    else:
        check_max_tokens(prompt_len, kwargs["max_tokens"], max_model_len)
    kwargs["stop"] = list(sp.stop)
    kwargs["stop_token_ids"] = list(sp.stop_token_ids)
    return SamplingParams(**kwargs)


def _usage(u) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens)


def timings_to_proto(t: RequestTimings | None) -> pb.Timings | None:
    if t is None:
        return None
    return pb.Timings(queue_ms=t.queue_s * 1e3, prefill_ms=t.prefill_s * 1e3, decode_ms=t.decode_s * 1e3)


def logprobs_to_proto(lps: list[TokenLogprobs] | None) -> list[pb.TokenLogprob]:
    if not lps:
        return []
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in lps
    ]


def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return _FINISH_TO_PB.get(reason, pb.FINISH_REASON_ERROR)


def _set_matched_stop(msg, matched_stop: int | str | None) -> None:
    if matched_stop is None:
        return
    if isinstance(matched_stop, str):
        msg.matched_stop_str = matched_stop
    else:
        msg.matched_stop_token_id = int(matched_stop)


def delta_to_chunk(delta: StreamDelta, request_id: str) -> pb.GenerateChunk:
    chunk = pb.GenerateChunk(
        request_id=request_id,
        index=delta.index,
        token_ids=delta.token_ids,
        text=delta.text,
        logprobs=logprobs_to_proto(delta.logprobs),
        usage=_usage(delta.usage),
        finish_reason=finish_reason_to_proto(delta.finish_reason),
    )
    _set_matched_stop(chunk, delta.matched_stop)
    if delta.finish_reason is not None:
        t = timings_to_proto(delta.timings)
        if t is not None:
            chunk.timings.CopyFrom(t)
    if delta.error:
        chunk.error = delta.error
    return chunk


class CompletionAccumulator:
    """Folds the stream of deltas of one request (all ``n`` indices) into a unary :class:`pb.GenerateResponse`."""

    def __init__(self, request_id: str, n: int):
        self.request_id = request_id
        self.completions = [pb.Completion(index=i) for i in range(n)]
        self._text: list[list[str]] = [[] for _ in range(n)]

    def add(self, delta: StreamDelta) -> None:
        while delta.index >= len(self.completions):  # defensive: an engine that yields more indices than n
            self.completions.append(pb.Completion(index=len(self.completions)))
            self._text.append([])
        c = self.completions[delta.index]
        c.token_ids.extend(delta.token_ids)
        self._text[delta.index].append(delta.text)
        c.logprobs.extend(logprobs_to_proto(delta.logprobs))
        c.usage.CopyFrom(_usage(delta.usage))
        if delta.finish_reason is not None:
            c.finish_reason = finish_reason_to_proto(delta.finish_reason)
            _set_matched_stop(c, delta.matched_stop)
            t = timings_to_proto(delta.timings)
            if t is not None:
                c.timings.CopyFrom(t)
        if delta.error:
            c.error = delta.error

    def response(self) -> pb.GenerateResponse:
        for c, parts in zip(self.completions, self._text):
            c.text = "".join(parts)
        prompt = max((c.usage.prompt_tokens for c in self.completions), default=0)
        cached = max((c.usage.cached_tokens for c in self.completions), default=0)
        total = sum(c.usage.completion_tokens for c in self.completions)
        return pb.GenerateResponse(
            request_id=self.request_id,
            completions=self.completions,
            usage=pb.Usage(prompt_tokens=prompt, completion_tokens=total, cached_tokens=cached),
        )


def model_info_to_proto(mi: ModelInfo) -> pb.ModelInfo:
    msg = pb.ModelInfo(
        model_name=mi.model_name,
        max_model_len=mi.max_model_len,
        vocab_size=mi.vocab_size,
        eos_token_ids=list(mi.eos_token_ids),
        dtype=mi.dtype,
        block_size=mi.block_size,
    )
    if mi.bos_token_id is not None:
        msg.bos_token_id = mi.bos_token_id
    return msg


def server_info_to_proto(si: ServerInfo, *, draining: bool, uptime_s: float) -> pb.ServerInfo:
    return pb.ServerInfo(
        version=si.version,
        num_running=si.num_running,
        num_waiting=si.num_waiting,
        kv_usage=si.kv_usage,
        num_preemptions=si.num_preemptions,
        instances=[
            pb.InstanceInfo(
                instance_id=i.instance_id,
                device=i.device,
                num_running=i.num_running,
                num_waiting=i.num_waiting,
                kv_usage=i.kv_usage,
                num_preemptions=i.num_preemptions,
                healthy=i.healthy,
            )
            for i in si.instances
        ],
        draining=draining or si.draining,
        uptime_s=uptime_s,
    )
