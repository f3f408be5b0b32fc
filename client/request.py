"""Request protos for the client's calls: :func:`build_generate_request` and the small builders for Abort,
Tokenize and Detokenize, shared by :class:`~accordion.client.client.Client` and its asyncio twin."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from accordion.protos import llm_service_pb2 as pb

__all__ = ["build_generate_request"]

_SAMPLING_FIELDS = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)


def build_generate_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    request_id: str = "",
    model: str = "",
    priority: int = 0,
    add_special_tokens: bool | None = None,
    add_generation_prompt: bool | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """The request proto for ``generate``/``stream``. Sampling keywords are the fields of
    ``accordion.v1.SamplingParams`` (temperature, top_p, top_k, min_p, repetition_penalty, frequency_penalty,
    presence_penalty, max_tokens, min_tokens, seed, n, stop, stop_token_ids, ignore_eos, logprobs,
    skip_special_tokens, include_stop_str_in_output); ``None`` means the server default."""
    given = [x is not None for x in (prompt, token_ids, messages)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, token_ids or messages")
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    req = pb.GenerateRequest(request_id=request_id, model=model, priority=priority)
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.messages.SetInParent()
        for m in messages:
            req.messages.messages.add(role=m["role"], content=m["content"])
        if add_generation_prompt is not None:
            req.messages.add_generation_prompt = add_generation_prompt
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    sp = req.sampling_params
    sp.SetInParent()
    for k, v in sampling.items():
        if v is None:
            continue
        if k == "stop":
            sp.stop.extend([v] if isinstance(v, str) else v)
        elif k == "stop_token_ids":
            sp.stop_token_ids.extend(v)
        else:
            setattr(sp, k, v)
    return req


def _abort_request(request_ids: str | Sequence[str]) -> pb.AbortRequest:
    ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
    return pb.AbortRequest(request_ids=ids)


def _tokenize_request(text: str, add_special_tokens: bool | None) -> pb.TokenizeRequest:
    req = pb.TokenizeRequest(text=text)
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


def _detokenize_request(token_ids: Sequence[int], skip_special_tokens: bool | None) -> pb.DetokenizeRequest:
    req = pb.DetokenizeRequest(token_ids=list(token_ids))
    if skip_special_tokens is not None:
        req.skip_special_tokens = skip_special_tokens
    return req
