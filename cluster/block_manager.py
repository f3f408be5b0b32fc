"""Paged KV block bookkeeping with automatic prefix caching.

Ownership: :class:`KVCacheManager` owns which block ids each request holds and the prefix-hash table; the
worker owns the KV tensors those ids index. Mechanism lives here, policy in the scheduler: ``allocate`` returns
``None`` when there is no room and the scheduler decides whom to preempt.

Prefix caching: every *full* block of a request's tokens gets a hash chained on its parent's
(``h_i = H(h_{i-1}, tokens of block i)``), so equal hashes mean equal prefixes. A freed block keeps its hash
and stays reusable until the allocator evicts it (least recently freed first). At idle every block is free
(possibly cached): ``num_free_blocks == num_blocks``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from accordion.cluster.request import Request

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """Chained digest of one full block; 16 bytes of BLAKE2b (collisions are not a practical concern)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockPool:
    """Fixed pool of block ids with reference counts, a free queue in LRU order and a hash -> block map."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int] | None:
        """n blocks from the free queue (evicting cached contents), or None if fewer are free."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self._cached.get(h) == b:
                    del self._cached[h]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def lookup(self, h: BlockHash) -> int | None:
        return self._cached.get(h) if self.enable_prefix_caching else None

    def touch(self, b: int) -> None:
        """Take one more reference on a (possibly free, cached) block."""
        if self.ref_cnt[b] == 0:
            del self._free[b]
        self.ref_cnt[b] += 1

    def release(self, blocks: list[int]) -> None:
        # Freed in reverse so that a request's tail blocks are evicted before its head (its prefix stays longer).
        for b in reversed(blocks):
            self.ref_cnt[b] -= 1
            assert self.ref_cnt[b] >= 0, f"block {b} released twice"
            if self.ref_cnt[b] == 0:
                self._free[b] = None

    def publish(self, b: int, h: BlockHash) -> None:
        """Record that block b now holds the full block with hash h."""
        if not self.enable_prefix_caching or self.block_hash[b] is not None:
            return
        self.block_hash[b] = h
        self._cached.setdefault(h, b)

    def check_invariants(self) -> None:
        in_free = set(self._free)
        for b in range(self.num_blocks):
            assert (self.ref_cnt[b] == 0) == (b in in_free), f"block {b}: ref {self.ref_cnt[b]}, free {b in in_free}"
        for h, b in self._cached.items():
            assert self.block_hash[b] == h, f"cached map points at block {b} with another hash"


class KVCacheManager:
    """Per-request block lists over one :class:`BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[int]] = {}
        self._req_hashes: dict[str, list[BlockHash]] = {}
        self._published: dict[str, int] = {}  # how many leading blocks of each request are already published

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks, extended lazily as tokens are added."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        n_full = len(tokens) // self.block_size
        while len(hashes) < n_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens[i * self.block_size:(i + 1) * self.block_size]))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks already holding a prefix of the request. At least one token is always left to compute."""
        if not self.pool.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in self._hashes(request)[:max_blocks]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def allocate(self, request: Request, num_tokens: int, cached_prefix: list[int] | None = None) -> list[int] | None:
        """Make room for the first ``num_tokens`` tokens of the request. Returns the new block ids or None.

        ``cached_prefix`` (from :meth:`find_cached_prefix`, only for a request holding no blocks yet) is adopted
        first, taking a reference on each block.
        """
        held = self.req_blocks.get(request.request_id, [])
        if cached_prefix:
            assert not held, "a cached prefix can only start a block list"
        need = self.blocks_for(num_tokens) - len(held) - len(cached_prefix or [])
        new: list[int] = []
        if need > 0:
            # Cached prefix blocks sitting in the free queue are not available for fresh allocation.
            reusable_free = sum(1 for b in cached_prefix or [] if self.pool.ref_cnt[b] == 0)
            if need > self.pool.num_free - reusable_free:
                return None
        for b in cached_prefix or []:
            self.pool.touch(b)
        if need > 0:
            new = self.pool.take(need)
            assert new is not None
        self.req_blocks[request.request_id] = held + list(cached_prefix or []) + new
        return list(cached_prefix or []) + new

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish hashes of the request's full blocks whose KV has been computed."""
        if not self.pool.enable_prefix_caching:
            return
        rid = request.request_id
        blocks = self.req_blocks.get(rid)
        if not blocks:
            return
        n_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        done = self._published.get(rid, 0)
        if n_full <= done:  # the common decode step: no block filled up
            return
        hashes = self._hashes(request)
        n = min(n_full, len(hashes))
        for i in range(done, n):
            self.pool.publish(blocks[i], hashes[i])
        self._published[rid] = n

    def free(self, request_id: str) -> None:
        blocks = self.req_blocks.pop(request_id, None)
        self._req_hashes.pop(request_id, None)
        self._published.pop(request_id, None)
        if blocks:
            self.pool.release(blocks)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        refs = [0] * self.pool.num_blocks
        for blocks in self.req_blocks.values():
            for b in blocks:
                refs[b] += 1
        assert refs == self.pool.ref_cnt, "reference counts do not match the requests' block lists"
