"""Moving one request's paged KV from one instance to another (live migration), staged through host memory.

Each layer's cache is one ``[2, num_blocks, block_size, Hkv, D]`` tensor (:mod:`accordion.workers.model_runner`).
The source gathers the request's blocks of one layer, ``[2, n, block_size, Hkv, D]``, copies them to host memory
and sends them; the destination receives into host memory and scatters them into its own blocks (other ids,
same order). Large layers go in chunks of whole blocks (``max_chunk_bytes``), so neither side ever stages more
than a few chunks. Both sides derive the same chunking from the block count, so no header crosses.

The traffic runs on the gloo group of the (source, destination) pair (:func:`~accordion.workers.multi_master.
pair_groups`): host memory, so it works on CPU and never parks a receive kernel on a GPU. The multi-master slice
server of that pair may be waiting on the same group for headers; migration messages carry their own tag, so
the two never match each other's messages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MIGRATION_TAG = 0x6D69  # "mi"
"""Tag of migration messages (multi-master traffic on the same pair group uses tag 0)."""

DEFAULT_CHUNK_BYTES = 64 << 20


def chunks(num_blocks: int, block_bytes: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[range]:
    """Consecutive ranges of block indices (into the request's block list) of at most ``max_chunk_bytes`` each
    (at least one block)."""
    per = max(1, max_chunk_bytes // max(1, block_bytes))
    return [range(i, min(i + per, num_blocks)) for i in range(0, num_blocks, per)]


def _layer_block_bytes(cache: torch.Tensor) -> int:
    """Bytes of one block of one layer, K and V: ``2 * block_size * Hkv * D * itemsize``."""
    return 2 * cache[0, 0].numel() * cache.element_size()


def send_blocks(kv_caches: list[torch.Tensor], block_ids: list[int], dst: int, group,
                max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Send the KV of ``block_ids`` (every layer, in layer order) to rank ``dst``; returns the bytes sent.

    Sends are posted asynchronously, at most two in flight, so gathering the next chunk overlaps the wire."""
    if not block_ids:
        return 0
    device = kv_caches[0].device
    parts = chunks(len(block_ids), _layer_block_bytes(kv_caches[0]), max_chunk_bytes)
    ids = torch.tensor(block_ids, dtype=torch.long, device=device)
    inflight: list[tuple[object, torch.Tensor]] = []
    sent = 0
    for cache in kv_caches:
        for part in parts:
            buf = cache[:, ids[part.start:part.stop]].to("cpu").contiguous()  # [2, n, block_size, Hkv, D]
            inflight.append((dist.isend(buf, dst=dst, group=group, tag=MIGRATION_TAG), buf))
            sent += buf.numel() * buf.element_size()
            if len(inflight) > 2:
                inflight.pop(0)[0].wait()
    for work, _ in inflight:
        work.wait()
    return sent


def recv_blocks(kv_caches: list[torch.Tensor], block_ids: list[int], src: int, group,
                max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Receive what :func:`send_blocks` sends into ``block_ids`` of every layer; returns the bytes received.

    Every message is received even if storing one fails (the source would otherwise wait for its peer); the
    first such error is raised at the end."""
    if not block_ids:
        return 0
    device = kv_caches[0].device
    parts = chunks(len(block_ids), _layer_block_bytes(kv_caches[0]), max_chunk_bytes)
    ids = torch.tensor(block_ids, dtype=torch.long, device=device)
    error: Exception | None = None
    received = 0
    for cache in kv_caches:
        for part in parts:
            shape = (2, len(part), *cache.shape[2:])
            buf = torch.empty(shape, dtype=cache.dtype)  # host staging: [2, n, block_size, Hkv, D]
            dist.recv(buf, src=src, group=group, tag=MIGRATION_TAG)
            received += buf.numel() * buf.element_size()
            try:
                cache[:, ids[part.start:part.stop]] = buf.to(device)
            except Exception as e:  # keep receiving: the sender must not be left waiting
                error = error or e
    if error is not None:
        raise error
    return received
