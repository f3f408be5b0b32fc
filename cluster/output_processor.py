"""Engine outputs (token ids) -> client deltas (text), with stop strings, for the front end.

The engine core knows only token ids; stop strings need text, so they are found here, as vLLM v1 does. A
completion that hits a stop string is reported finished with reason STOP and its engine request must be aborted
by the caller (``process`` returns those ids). While streaming, the last ``max(len(stop)) - 1`` characters are
held back so that a stop string is never partly sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from accordion.cluster.outputs import EngineOutput, StreamDelta, TokenLogprobs, Usage
from accordion.cluster.request import FinishReason, SamplingParams
from accordion.cluster.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _Completion:
    parent_id: str
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    num_prompt_tokens: int
    text: str = ""
    sent_chars: int = 0
    token_ids: list[int] = field(default_factory=list)
    sent_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    sent_logprobs: int = 0
    finished: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._live: dict[str, _Completion] = {}

    def add(self, engine_request_id: str, parent_id: str, index: int, prompt_token_ids: list[int],
            params: SamplingParams) -> None:
        detok = self.tokenizer.decode_stream(prompt_token_ids, params.skip_special_tokens)
        self._live[engine_request_id] = _Completion(parent_id, index, params, detok, len(prompt_token_ids))

    def discard(self, engine_request_id: str) -> None:
        self._live.pop(engine_request_id, None)

    def __contains__(self, engine_request_id: str) -> bool:
        return engine_request_id in self._live

    def process(self, outputs: list[EngineOutput]) -> tuple[list[StreamDelta], list[str]]:
        """Returns the deltas to send and the engine request ids to abort (stop string matched)."""
        deltas, to_abort = [], []
        for out in outputs:
            c = self._live.get(out.request_id)
            if c is None:
                continue
            finish, matched = out.finish_reason, out.stop_token_id
            for tok in out.new_token_ids:
                c.token_ids.append(tok)
                c.text += c.detok.step(tok)
            if out.new_logprobs:
                c.logprobs.extend(out.new_logprobs)
            hit = self._find_stop(c)
            if hit is not None and finish in (None, FinishReason.STOP, FinishReason.LENGTH):
                matched, finish = hit, FinishReason.STOP
                if out.finish_reason is None:
                    to_abort.append(out.request_id)
            if finish is not None:
                c.finished = True
                del self._live[out.request_id]
            deltas.append(self._delta(c, out, finish, matched))
        return deltas, to_abort

    def _find_stop(self, c: _Completion) -> str | None:
        p = c.params
        if not p.stop or len(c.token_ids) <= p.min_tokens:
            return None
        longest = max(len(s) for s in p.stop)
        # Only the tail can hold a new match: search from just before what was already checked.
        lo = max(0, c.sent_chars - longest)
        best: tuple[int, str] | None = None
        for s in p.stop:
            i = c.text.find(s, lo)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        c.text = c.text[: i + len(s)] if p.include_stop_str_in_output else c.text[:i]
        return s

    def _delta(self, c: _Completion, out: EngineOutput, finish: FinishReason | None, matched) -> StreamDelta:
        hold = 0 if finish is not None or not c.params.stop else max(len(s) for s in c.params.stop) - 1
        visible = max(c.sent_chars, len(c.text) - hold)
        text = c.text[c.sent_chars:visible]
        c.sent_chars = visible
        toks = c.token_ids[c.sent_tokens:]
        c.sent_tokens = len(c.token_ids)
        lps = c.logprobs[c.sent_logprobs:] if c.params.logprobs is not None else None
        c.sent_logprobs = len(c.logprobs)
        usage = Usage(c.num_prompt_tokens, len(c.token_ids), out.num_cached_tokens)
        return StreamDelta(c.parent_id, c.index, toks, text, lps, finish, matched, usage, out.timings, out.error)
