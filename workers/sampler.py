"""Token sampling for one step: penalties, min-tokens masking, greedy, temperature, top-k/top-p/min-p, seeds.

Sampling uses the exponential-race form of the Gumbel-max trick (``argmax(p / q)``, ``q ~ Exp(1)``). A seeded
request draws its noise from a generator seeded by ``(seed, output index)``, so its samples do not depend on
the rest of the batch, nor on preemption and recomputation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from accordion.cluster.outputs import TokenLogprobs
from accordion.cluster.request import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs about one sampled row."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: tuple[int, ...]


def _row_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @staticmethod
    def plain_greedy(rows: list[SampleRow]) -> bool:
        """Every row is greedy with no penalties, logprobs or min_tokens: the token is argmax(logits), on the
        device, and needs nothing from the host (what async scheduling relies on)."""
        return all(r.params.greedy and r.params.logprobs is None and not r.params.needs_penalties
                   and r.params.min_tokens == 0 for r in rows)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [S, V] float32 -> (token per row, logprobs per row or None)."""
        S, V = logits.shape
        params = [r.params for r in rows]
        if self.plain_greedy(rows):
            return logits.argmax(dim=-1).tolist(), [None] * S  # the common greedy case: one kernel, one sync
        want_lp = [p.logprobs for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(n is not None for n in want_lp) else None

        if any(p.needs_penalties for p in params):
            logits = self._apply_penalties(logits, rows)
        self._mask_min_tokens(logits, rows)

        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            sampled = self._sample(logits, rows)
            tokens = torch.where(greedy, tokens, sampled)
        token_list = tokens.tolist()

        lps: list[TokenLogprobs | None] = [None] * S
        if raw_logprobs is not None:
            n_max = max(n for n in want_lp if n is not None)
            top_v, top_i = raw_logprobs.topk(max(n_max, 1), dim=-1)
            chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for s, n in enumerate(want_lp):
                if n is not None:
                    lps[s] = TokenLogprobs(token_list[s], chosen[s], list(zip(top_i[s][:n], top_v[s][:n])))
        return token_list, lps

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        S, V = logits.shape
        logits = logits.clone()
        out_counts = torch.zeros(S, V, device=self.device)
        prompt_mask = torch.zeros(S, V, dtype=torch.bool, device=self.device)
        for s, r in enumerate(rows):
            if not r.params.needs_penalties:
                continue
            if r.output_token_ids:
                ids = torch.tensor(r.output_token_ids, device=self.device)
                out_counts[s].index_add_(0, ids, torch.ones_like(ids, dtype=out_counts.dtype))
            if r.params.repetition_penalty != 1.0:
                prompt_mask[s, torch.tensor(r.prompt_token_ids, device=self.device)] = True
        rep = torch.tensor([r.params.repetition_penalty for r in rows], device=self.device)[:, None]
        freq = torch.tensor([r.params.frequency_penalty for r in rows], device=self.device)[:, None]
        pres = torch.tensor([r.params.presence_penalty for r in rows], device=self.device)[:, None]
        seen = prompt_mask | (out_counts > 0)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        return logits - freq * out_counts - pres * (out_counts > 0).float()

    def _mask_min_tokens(self, logits: torch.Tensor, rows: list[SampleRow]) -> None:
        for s, r in enumerate(rows):
            p = r.params
            if len(r.output_token_ids) < p.min_tokens:
                stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
                if stop_ids:
                    logits[s, stop_ids] = float("-inf")

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=self.device)
        logits = logits / temp[:, None]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = self._top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if any(m > 0 for m in min_p):
            mp = torch.tensor(min_p, device=self.device)[:, None]
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        q = torch.empty_like(probs)
        q.exponential_(generator=self.generator)
        for s, r in enumerate(rows):
            if r.params.seed is not None:
                g = torch.Generator(device=self.device)
                g.manual_seed(_row_seed(r.params.seed, len(r.output_token_ids)))
                q[s].exponential_(generator=g)
        return (probs / q).argmax(dim=-1)

    def _top_k_top_p(self, logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        V = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.tensor([kk if 0 < kk < V else V for kk in top_k], device=self.device)
        ranks = torch.arange(V, device=self.device)[None, :]
        remove = ranks >= k[:, None]
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        p = torch.tensor(top_p, device=self.device)[:, None]
        remove |= (probs.cumsum(dim=-1) - probs) > p  # keep the smallest prefix reaching top_p (>= 1 token)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
