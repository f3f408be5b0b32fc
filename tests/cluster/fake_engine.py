"""A deterministic fake :class:`EngineClient` (and tokenizer) for front-end tests. No torch, no model.

Token at step s of completion i = crc32(prompt, i, s) % vocab_size; one step every ``step_s`` seconds. Honours
max_tokens, min_tokens, ignore_eos, stop_token_ids, n, logprobs and abort (Abort RPC or closing the iterator).
``inflight`` holds the ids being generated, ``aborted`` the ids that were aborted (in order), so tests can assert
that a cancel freed the request.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass, field

from accordion.cluster.engine_client import InstanceInfo, ModelInfo, ServerInfo
from accordion.cluster.outputs import RequestTimings, StreamDelta, TokenLogprobs, Usage
from accordion.cluster.request import FinishReason, SamplingParams

VOCAB = 1000
BOS = 1
EOS = 2
NUM_SPECIAL = 3  # ids 0..2 are special; bytes map to 3..258


class FakeTokenizer:
    """Bytes are tokens (id = byte + 3); BOS=1, EOS=2. Decoding maps every id to a printable letter."""

    vocab_size = VOCAB
    eos_token_ids = [EOS]
    bos_token_id = BOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + NUM_SPECIAL for b in text.encode("utf-8")]
        return ([BOS] if add_special_tokens else []) + ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.piece(t) for t in token_ids if not (skip_special_tokens and t < NUM_SPECIAL))

    @staticmethod
    def piece(t: int) -> str:
        return chr(ord("a") + t % 26)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if any(m["role"] == "forbidden" for m in messages):
            raise ValueError("roles must alternate user/assistant")
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))


@dataclass
class FakeEngine:
    step_s: float = 0.005
    max_model_len: int = 256
    model_name: str = "fake-model"
    ready: bool = True
    fail_next: list[BaseException] = field(default_factory=list)
    """Exceptions to raise (one per generate call, in order) before the first delta."""
    inflight: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    last_params: SamplingParams | None = None
    last_prompt: list[int] | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self._tokenizer = FakeTokenizer()
        self._abort_flags: set[str] = set()

    @property
    def tokenizer(self) -> FakeTokenizer:
        return self._tokenizer

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.model_name, self.max_model_len, VOCAB, [EOS], BOS, "float32", 16)

    async def server_info(self) -> ServerInfo:
        n = len(self.inflight)
        return ServerInfo(
            version="fake-0", num_running=n, num_waiting=0, kv_usage=min(1.0, n / 10),
            num_preemptions=self.num_preemptions,
            instances=[InstanceInfo("fake-0", "cpu", num_running=n, kv_usage=min(1.0, n / 10))],
        )

    def is_ready(self) -> bool:
        return self.ready

    async def abort(self, request_ids: list[str]) -> list[str]:
        found = [r for r in request_ids if r in self.inflight]
        self._abort_flags.update(found)
        return found

    @staticmethod
    def token_at(prompt: list[int], index: int, step: int) -> int:
        return zlib.crc32(repr((prompt, index, step)).encode()) % VOCAB

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, priority: int = 0):
        return self._generate(request_id, list(prompt_token_ids), params)

    async def _generate(self, request_id: str, prompt: list[int], params: SamplingParams):
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.last_params, self.last_prompt = params, prompt
        self.inflight.add(request_id)
        self.started.append(request_id)
        arrival = time.monotonic()
        first_token_time = None
        done: set[int] = set()
        counts = [0] * params.n
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt)
        clean = False
        try:
            step = 0
            while len(done) < params.n:
                await asyncio.sleep(self.step_s)
                if request_id in self._abort_flags:
                    for i in range(params.n):
                        if i not in done:
                            yield StreamDelta(request_id, i, [], "", finish_reason=FinishReason.ABORT,
                                              usage=Usage(len(prompt), counts[i], 0))
                    self.aborted.append(request_id)
                    clean = True
                    return
                for i in range(params.n):
                    if i in done:
                        continue
                    tok = self.token_at(prompt, i, step)
                    counts[i] += 1
                    first_token_time = first_token_time or time.monotonic()
                    reason, matched = None, None
                    may_stop = counts[i] > params.min_tokens
                    if may_stop and not params.ignore_eos and tok == EOS:
                        reason, matched = FinishReason.STOP, tok
                    elif may_stop and tok in params.stop_token_ids:
                        reason, matched = FinishReason.STOP, tok
                    elif counts[i] >= max_tokens:
                        reason = FinishReason.LENGTH
                    lps = None
                    if params.logprobs is not None:
                        top = [((tok + k) % VOCAB, -1.0 - k) for k in range(params.logprobs)]
                        lps = [TokenLogprobs(tok, -0.5, top)]
                    timings = None
                    if reason is not None:
                        done.add(i)
                        now = time.monotonic()
                        timings = RequestTimings(0.001, first_token_time - arrival, now - first_token_time)
                    yield StreamDelta(request_id, i, [tok], self._tokenizer.piece(tok), logprobs=lps,
                                      finish_reason=reason, matched_stop=matched,
                                      usage=Usage(len(prompt), counts[i], 0), timings=timings)
                step += 1
            clean = True
            self.finished.append(request_id)
        finally:
            if not clean:  # closed or cancelled mid-stream: that is an abort
                self.aborted.append(request_id)
            self.inflight.discard(request_id)
            self._abort_flags.discard(request_id)
