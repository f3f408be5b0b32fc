"""Multi-master decoding (LoongServe's scale-up): a request whose KV stays spread over several instances.

When a sequence-parallel prefill's placement leaves slices of the prompt's KV on other instances (the master has
no room for all of it), the master still decodes the request, and the K/V of its new tokens go to the *tail*
holder, the instance with the last slice, which reserved room for them. A request also becomes spread while
decoding when its instance runs out of blocks (scale-up: another instance becomes its tail, see
``EngineInstance.attach_tail``). In every layer of every decode step::

    master:  q, k, v of its spread rows ----------------------> each holder of those rows (one message each)
             partial attention over its own slice                holder: stores k, v (the tail only), partial
             merge by log-sum-exp  <---------------------------  attention of q over its slice: (o, lse)

Every instance is master of its own mini-batch and serves the slices it holds for other masters from one server
thread per master (own CUDA stream), so masters step independently and no instance waits for another's step.
The traffic of each (master -> holder) pair runs on a host-memory (gloo) process group of its own (one per ordered
pair, created when the instance group forms), so a holder's server thread and its own engine thread never share a
communicator, and no GPU kernel ever waits on another instance (see :func:`pair_groups`).

Per step the master sends each holder it needs a fixed-size int64 header first::

    [n_rows, n_release, (sid, store_pos) * n_rows, ..., sid * n_release]    (n_rows = -1: stop the server)

``sid`` is the spread id (the prefill job's id); ``store_pos`` the position whose K/V that holder stores (-1:
none). Released sids free the holder's slice (the master finished, aborted or lost the request).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from accordion.workers.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


@dataclass
class SpreadState:
    """Master side: where a decoding request's KV lives besides this instance's slice ``[0, local_len)``."""

    sid: int
    local_len: int
    holders: list[int]
    """Ranks of the other slices, in position order; the last one is the tail (stores new tokens)."""

    @property
    def tail(self) -> int:
        return self.holders[-1]


@dataclass
class _Slice:
    """Holder side: positions ``[start, start + stored)`` of one spread request in ``block_ids``."""

    request_id: str
    block_ids: list[int]
    start: int
    stored: int


def pair_groups(world: int) -> dict[tuple[int, int], object]:
    """One gloo process group per ordered pair (master, holder). Every rank must call this, in the same order.

    Host memory, not NCCL, on purpose: a decode step moves a few KiB per layer, and an NCCL receive would sit on
    the GPU as a spinning kernel while it waits for the master's next step; a kernel load in another thread of the
    process (CUDA lazy loading synchronises the context) then waits for it forever. Seen on 2xH100 (py-spy): the
    master loading a Triton kernel while its slice server's receive waited for the other master, which waited
    for it."""
    return {(m, h): dist.new_group([m, h], backend="gloo") for m in range(world) for h in range(world) if m != h}


def _header_size(cap: int) -> int:
    return 2 + 3 * cap


class SliceServer:
    """Holder side: serves the slices this instance keeps for other masters, one thread per master."""

    def __init__(self, runner, rank: int, groups: dict[tuple[int, int], object], cap: int,
                 release: Callable[[str], None]):
        self.runner = runner
        self.rank = rank
        self.groups = groups
        self.cap = cap
        self.release = release
        """Called with a request id when its slice is released (frees the blocks on the engine thread)."""
        self._slices: dict[int, _Slice] = {}
        self._cond = threading.Condition()
        self._threads: dict[int, threading.Thread] = {}
        self._released_early: set[int] = set()

    @property
    def num_slices(self) -> int:
        with self._cond:
            return len(self._slices)

    def register(self, master: int, sid: int, request_id: str, block_ids: list[int], start: int, stored: int):
        """A slice written by a sequence-parallel prefill; ``master`` will decode with it."""
        with self._cond:
            if sid in self._released_early:  # the master gave up before this slice was registered
                self._released_early.discard(sid)
                self.release(request_id)
                return
            self._slices[sid] = _Slice(request_id, list(block_ids), start, stored)
            self._cond.notify_all()
        if master not in self._threads:
            t = threading.Thread(target=self._serve, args=(master,), name=f"slice-server-{master}", daemon=True)
            self._threads[master] = t
            t.start()

    def drop(self, sid: int) -> str | None:
        """Unregister a slice; its request id (the caller frees its blocks), or None if unknown."""
        with self._cond:
            s = self._slices.pop(sid, None)
        return None if s is None else s.request_id

    def join(self, timeout_s: float = 2.0) -> None:
        """Wait for the server threads, which end on their masters' stop headers (a master that is not leaving
        sends none: its thread ends when the group is destroyed)."""
        for master, t in self._threads.items():
            t.join(timeout_s)
            if t.is_alive():
                logger.warning("slice server for master %d did not stop (master gone?)", master)
        self._threads.clear()

    # ---- the server thread -------------------------------------------------------------------------------------

    def _serve(self, master: int) -> None:
        r = self.runner
        group = self.groups[(master, self.rank)]
        stream = torch.cuda.Stream(r.device) if r.device.type == "cuda" else None
        if stream is not None:
            torch.cuda.set_device(r.device)
        hdr = torch.empty(_header_size(self.cap), dtype=torch.int64)
        try:
            with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                while True:
                    dist.recv(hdr, src=master, group=group)
                    h = hdr.tolist()
                    n, n_rel = h[0], h[1]
                    if n < 0:
                        return
                    for sid in h[2 + 2 * self.cap:2 + 2 * self.cap + n_rel]:
                        with self._cond:
                            s = self._slices.pop(sid, None)
                            if s is None:
                                self._released_early.add(sid)
                        if s is not None:
                            self.release(s.request_id)
                    if n:
                        self._attend(master, group, [(h[2 + 2 * i], h[3 + 2 * i]) for i in range(n)])
        except Exception:  # the group went away under us (re-forming, a peer died): nothing left to serve
            logger.warning("slice server for master %d on rank %d stopped", master, self.rank, exc_info=True)

    def _slice(self, sid: int, timeout_s: float = 60.0) -> _Slice:
        """The registered slice (the master may start decoding before this instance finished registering)."""
        with self._cond:
            if not self._cond.wait_for(lambda: sid in self._slices, timeout_s):
                raise RuntimeError(f"rank {self.rank}: no slice registered for spread id {sid}")
            return self._slices[sid]

    def _attend(self, master: int, group, rows: list[tuple[int, int]]) -> None:
        """All layers of one master step: store the tail K/V, partial attention, send (o, lse) back."""
        r, a = self.runner, self.runner.arch
        bs, dev = r.block_size, r.device
        slices = [self._slice(sid) for sid, _ in rows]
        slots, lens = [], []
        for s, (sid, pos) in zip(slices, rows):
            if pos >= 0:
                rel = pos - s.start
                if rel != s.stored or rel // bs >= len(s.block_ids):
                    raise RuntimeError(f"spread id {sid}: position {pos} does not extend the slice "
                                       f"[{s.start}, {s.start + s.stored}) of {len(s.block_ids)} blocks")
                slots.append(s.block_ids[rel // bs] * bs + rel % bs)
                s.stored += 1
            else:
                slots.append(-1)
            lens.append(s.stored)
        n = len(rows)
        width = max(len(s.block_ids) for s in slices)
        table = torch.zeros(n, width, dtype=torch.int32)
        for i, s in enumerate(slices):
            table[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
        meta = AttentionMetadata(
            num_decodes=n, slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev),
            block_table=table.to(dev), seq_lens=torch.tensor(lens, dtype=torch.int32).to(dev),
            query_start_loc=torch.arange(n + 1, dtype=torch.int32).to(dev), max_query_len=0,
            max_seq_len=max(256, 1 << max(0, max(lens) - 1).bit_length()), seq_lens_cpu=lens, query_lens_cpu=[1] * n)
        hq, hkv, d = a.num_heads, a.num_kv_heads, a.head_dim
        for layer in range(a.num_layers):
            buf = torch.empty(n, hq + 2 * hkv, d, dtype=r.dtype)
            dist.recv(buf, src=master, group=group)
            q, k, v = (x.to(dev).contiguous() for x in buf.split([hq, hkv, hkv], dim=1))
            out, lse = r.backend.forward(q, k, v, r.kv_caches[layer], meta)
            dist.send(torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1).cpu(), dst=master, group=group)


@dataclass
class StepExchange:
    """Master side, one step: for each holder, the step's token rows whose attention it completes."""

    group_of: dict[int, object]
    """holder rank -> the pair's group."""
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    """holder rank -> [n] int64 token indices (device)."""


class SpreadExchange:
    """Master side: per-step headers, releases, and the stop message when the group re-forms."""

    def __init__(self, rank: int, groups: dict[tuple[int, int], object], cap: int, device: torch.device):
        self.rank = rank
        self.groups = groups
        self.cap = cap
        self.device = device
        self._releases: dict[int, list[int]] = {}
        self._used: set[int] = set()
        self._inflight: list = []  # (work, tensor) of sends not known to be complete (gloo needs them alive)

    def release(self, spread: SpreadState) -> None:
        """The request is gone here: its holders free their slices with the next header they get."""
        for h in spread.holders:
            self._releases.setdefault(h, []).append(spread.sid)

    @property
    def has_releases(self) -> bool:
        return bool(self._releases)

    def _send(self, holder: int, header: torch.Tensor) -> None:
        """Post a header (a holder that is gone is logged and skipped: its rows fail in the layer exchange)."""
        self._used.add(holder)
        try:
            work = dist.isend(header, dst=holder, group=self.groups[(self.rank, holder)])
        except RuntimeError as e:
            logger.warning("rank %d: header to holder %d failed: %s", self.rank, holder, e)
            return
        self._inflight = [(w, t) for w, t in self._inflight if not w.is_completed()]
        self._inflight.append((work, header))

    def _header(self, rows: list[tuple[int, int]], releases: list[int]) -> torch.Tensor:
        h = [0] * _header_size(self.cap)
        h[0], h[1] = len(rows), len(releases)
        for i, (sid, pos) in enumerate(rows):
            h[2 + 2 * i], h[3 + 2 * i] = sid, pos
        h[2 + 2 * self.cap:2 + 2 * self.cap + len(releases)] = releases
        return torch.tensor(h, dtype=torch.int64)

    def begin_step(self, spread_rows: list[tuple[int, str, SpreadState, int]]) -> StepExchange:
        """Send this step's headers. ``spread_rows``: (token index, request id, state, position) of each spread
        decode row."""
        by_holder: dict[int, list[tuple[int, int, int]]] = {}
        for idx, _, st, pos in spread_rows:
            for h in st.holders:
                by_holder.setdefault(h, []).append((idx, st.sid, pos if h == st.tail else -1))
        ex = StepExchange({h: self.groups[(self.rank, h)] for h in by_holder})
        for h, rows in by_holder.items():
            if len(rows) > self.cap:
                raise RuntimeError(f"{len(rows)} spread rows for rank {h} exceed the header's {self.cap}")
            self._send(h, self._header([(sid, pos) for _, sid, pos in rows], self._take_releases(h)))
            ex.rows[h] = torch.tensor([i for i, _, _ in rows], dtype=torch.long, device=self.device)
        self.flush()
        return ex

    def _take_releases(self, holder: int) -> list[int]:
        rel = self._releases.get(holder, [])
        take, rest = rel[:self.cap], rel[self.cap:]
        if rest:
            self._releases[holder] = rest
        else:
            self._releases.pop(holder, None)
        return take

    def flush(self) -> None:
        """Header-only messages carrying the releases not sent with a step."""
        for h in list(self._releases):
            while h in self._releases:
                self._send(h, self._header([], self._take_releases(h)))

    def stop(self) -> None:
        """Stop the server threads this master used (the group is re-forming or the instance is leaving). A
        holder that is gone (removed, dead) is skipped."""
        stop = torch.zeros(_header_size(self.cap), dtype=torch.int64)
        stop[0] = -1
        for h in sorted(self._used):
            try:
                while h in self._releases:
                    self._send(h, self._header([], self._take_releases(h)))
                self._send(h, stop)
            except RuntimeError as e:
                logger.info("rank %d: holder %d is gone (%s)", self.rank, h, e)
        for w, _ in self._inflight:
            try:
                w.wait()
            except RuntimeError:  # the peer is gone
                pass
        self._inflight.clear()
        self._used.clear()
        self._releases.clear()


class MultiMasterAttention(AttentionBackend):
    """The master's attention for a step with spread rows: local partial attention merged with the holders'."""

    name = "multi-master"
    stores_kv_with_rotary = False  # the holders need this step's k, v

    def __init__(self, base: AttentionBackend, ex: StepExchange):
        super().__init__(base.num_heads, base.num_kv_heads, base.head_dim, base.scale)
        self.base = base
        self.ex = ex

    def forward(self, q, k, v, kv_cache, meta):
        """q [T, Hq, D]; k, v [T, Hkv, D] -> (out [T, Hq, D], lse [T, Hq]); spread rows' keys are local ones
        (``meta`` gives them their local length and no local slot) plus every holder's."""
        ex, d = self.ex, self.head_dim
        pending = []
        for h, idx in ex.rows.items():
            pack = torch.cat([q[idx], k[idx], v[idx]], dim=1).cpu()
            res = torch.empty(idx.shape[0], self.num_heads, d + 1, dtype=torch.float32)
            dist.send(pack, dst=h, group=ex.group_of[h])
            work = dist.irecv(res, src=h, group=ex.group_of[h])
            pending.append((idx, res, work))
        out, lse = self.base.forward(q, k, v, kv_cache, meta)
        for idx, res, work in pending:
            work.wait()
            res = res.to(q.device)
            o, s = _merge(out[idx], lse[idx], res[..., :d], res[..., d])
            out[idx] = o.to(out.dtype)
            lse[idx] = s
        return out, lse


def _merge(o1, lse1, o2, lse2):
    if o1.is_cuda:
        from accordion.kernels.attention import merge_attention_states

        return merge_attention_states(o1, lse1, o2.contiguous(), lse2.contiguous())
    from accordion.kernels.attention.reference import ref_merge_attention_states

    return ref_merge_attention_states(o1, lse1, o2, lse2)
