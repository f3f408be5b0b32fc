"""Elastic sequence parallelism planning (LoongServe): how many instances prefill a prompt, and who keeps its KV.

* :class:`PrefillCostModel` predicts prefill time per degree of parallelism,
  ``T(sp, l) = A_sp + B_sp * sum(l) + C_sp * sum(l^2)``; ``accordion profile`` measures it and stores it as JSON.
* :func:`choose_degree` picks the degree for a prompt from the idle instances: the fastest predicted time, but
  one more instance must buy at least ``min_gain`` of speed-up (instances are not free: they serve others).
* :func:`plan_placement` places the KV of a request that fits on no single instance: slices kept by the
  instances the ring passes the K/V by, as few as possible (the master first), the last one with room for the
  decoded tokens, so decoding continues with the KV where it is (multi-master decoding) and nothing moves
  after the prefill. A request that fits on its master keeps it all there (proactive scale-down).

Pure Python; tested on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class PrefillCostModel:
    coeffs: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    """degree -> (A seconds, B seconds per token, C seconds per token^2)."""

    def predict(self, degree: int, lengths: list[int]) -> float:
        a, b, c = self.coeffs[degree]
        s1 = float(sum(lengths))
        s2 = float(sum(x * x for x in lengths))
        return a + b * s1 + c * s2

    @property
    def degrees(self) -> list[int]:
        return sorted(self.coeffs)

    @classmethod
    def fit(cls, samples: list[tuple[int, list[int], float]]) -> PrefillCostModel:
        """Least squares per degree over (degree, prompt lengths of the batch, measured seconds)."""
        by_degree: dict[int, list[tuple[list[int], float]]] = {}
        for degree, lengths, seconds in samples:
            by_degree.setdefault(degree, []).append((lengths, seconds))
        coeffs = {}
        for degree, rows in by_degree.items():
            x = np.array([[1.0, sum(ls), sum(v * v for v in ls)] for ls, _ in rows])
            coeffs[degree] = _nonnegative_lstsq(x, np.array([s for _, s in rows]))
        return cls(coeffs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({str(k): v for k, v in self.coeffs.items()}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> PrefillCostModel:
        raw = json.loads(Path(path).read_text())
        return cls({int(k): tuple(v) for k, v in raw.items()})

    @classmethod
    def for_config(cls, esp) -> PrefillCostModel:
        """The model an :class:`~accordion.cluster.config.ESPConfig` names (``accordion profile``'s JSON), else
        the analytic one."""
        return cls.load(esp.cost_model_path) if esp.cost_model_path else cls.analytic(esp.max_degree)

    @classmethod
    def analytic(cls, max_degree: int, b: float = 1e-4, c: float = 1e-9, a: float = 5e-3,
                 a_per_instance: float = 2e-2) -> PrefillCostModel:
        """Ideal 1/sp scaling plus a fixed cost per extra instance, for use before ``accordion profile``."""
        return cls({d: (a + a_per_instance * (d - 1), b / d, c / d) for d in range(1, max_degree + 1)})


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares with every coefficient >= 0: with three terms, the best fit over the subsets of terms."""
    best, best_err = (0.0, 0.0, 0.0), float("inf")
    for mask in range(1, 8):
        cols = [i for i in range(3) if mask >> i & 1]
        sol, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (sol < 0).any():
            continue
        err = float(np.sum((x[:, cols] @ sol - y) ** 2))
        if err < best_err:
            full = [0.0, 0.0, 0.0]
            for i, v in zip(cols, sol):
                full[i] = float(v)
            best, best_err = tuple(full), err
    return best


def choose_degree(cost: PrefillCostModel, length: int, available: int, *, min_gain: float = 1.25) -> int:
    """Degree of parallelism for one prompt given ``available`` idle instances (>= 1)."""
    best = 1
    for degree in cost.degrees:  # each step up must speed the prefill by min_gain over the current choice
        if best < degree <= available and cost.predict(best, [length]) >= min_gain * cost.predict(degree, [length]):
            best = degree
    return best


def plan_placement(num_tokens: int, extra_tokens: int, block_size: int, group: list, free_blocks: dict
                   ) -> list[tuple[object, int, int, int]] | None:
    """Where a request's KV goes when no single instance has room for it (multi-master decoding).

    Contiguous slices ``(member, start, end, extra)`` cover the prompt's ``num_tokens`` positions (each holder
    stores its slice from the start of its own blocks, so slices need not be block-aligned):
    the master (``group[0]``) first, then the other members in order of free space, each up to its free blocks.
    The last slice (the tail) also reserves ``extra`` = ``extra_tokens`` positions for the tokens decoding
    will add (it may hold no prompt position at all). None if the group cannot hold it all.
    """
    order = [group[0]] + sorted(group[1:], key=lambda m: -free_blocks.get(m, 0))
    slices, start = [], 0
    for member in order:
        cap = free_blocks.get(member, 0) * block_size
        if cap <= 0:
            continue
        rest = num_tokens - start
        if rest + extra_tokens <= cap:  # the tail: the rest of the prompt plus room for the new tokens
            slices.append((member, start, num_tokens, extra_tokens))
            return slices
        if rest > 0:
            end = start + min(rest, cap)
            slices.append((member, start, end, 0))
            start = end
    return None
