"""Prompt checks shared by every front door (gRPC servicer, engine clients), so each rule lives in one place.

All raise :class:`~accordion.cluster.errors.RequestValidationError` (or its subclass
:class:`~accordion.cluster.errors.RequestTooLargeError`) naming the offending field.
"""

from __future__ import annotations

from collections.abc import Iterable

from accordion.cluster.errors import RequestTooLargeError, RequestValidationError


def validate_token_ids(ids: Iterable[int], vocab_size: int, field_name: str = "token_ids") -> list[int]:
    """Return ``ids`` as a list, or raise naming the first id outside ``[0, vocab_size)``."""
    out = list(ids)
    for i, t in enumerate(out):
        if t < 0 or t >= vocab_size:
            raise RequestValidationError(
                field_name, f"token id {t} at index {i} is out of the vocabulary (must be in [0, {vocab_size}))"
            )
    return out


def check_prompt_room(prompt_len: int, max_model_len: int) -> int:
    """Raise if a prompt leaves no room to generate; else return how many new tokens fit."""
    if prompt_len >= max_model_len:
        raise RequestTooLargeError(
            "prompt", f"prompt has {prompt_len} tokens; max_model_len is {max_model_len} (no room to generate)"
        )
    return max_model_len - prompt_len


def check_max_tokens(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """Raise if ``prompt_len + max_tokens`` exceeds ``max_model_len``."""
    room = check_prompt_room(prompt_len, max_model_len)
    if max_tokens > room:
        raise RequestTooLargeError(
            "max_tokens",
            f"prompt has {prompt_len} tokens; max_model_len is {max_model_len}, so max_tokens must be at most "
            f"{room}, got {max_tokens}",
        )


def validate_prompt(prompt_token_ids: Iterable[int], vocab_size: int, max_model_len: int,
                    max_tokens: int | None, field_name: str = "prompt") -> list[int]:
    """The whole prompt check of an engine client: non-empty, in the vocabulary, fits with ``max_tokens``."""
    ids = list(prompt_token_ids)
    if not ids:
        raise RequestValidationError(field_name, "prompt is empty (0 tokens)")
    validate_token_ids(ids, vocab_size, field_name)
    if max_tokens is None:
        check_prompt_room(len(ids), max_model_len)
    else:
        check_max_tokens(len(ids), max_tokens, max_model_len)
    return ids
