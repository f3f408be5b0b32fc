"""Which decode schedule and tiles a paged decode launch uses, from shapes alone (no host sync): split-KV over one
well-filled wave, K/V pages by TMA when programs crowd the SMs, one deep-pipelined program per SM for rows known to be
equally long that fill the SMs once, or stream-K for batches of unequal lengths. The
numbers behind each rule are in the docstrings (1xH100, bench/tune_attention.py); the H200, whose HBM3e streams 1.4x
faster, takes wider tiles in the deep and stream-K schedules (`deep_config`, `lean_config`)."""

from __future__ import annotations

import math

import torch

from ..utils import cdiv, is_h200, is_hopper, is_interpreter, num_sms

MAX_SPLITS = 64
# Stream-K's fixed costs (its prefix sums, rows cut into many pieces merged one by one) lose to split-KV on short
# batches: from CUDA graphs on an H100 at 8 kv heads, lengths uniform in [16, 1k], split-KV ran 1.52x stream-K at
# 4 sequences, 1.19x at 8, 1.03x at 16, 1.06x at 64 (stream-K 1.08x at 128); in [64, 4k] split-KV won only at 4
# (1.17x) and stream-K 1.03-1.34x from 8 up; in [256, 8k] split-KV 1.02x at 4, stream-K 1.19-1.39x from 8
# (bench/results/experiments/decode-short-contexts-*.json; again at 3f9a5ae, tune-attention-...T183335Z.json). Hence
# stream-K only with at least LEAN_MIN_KEYS_PER_SLOT keys of work per resident program slot (rows x the context
# bound), and up to LEAN_MIN_CONTEXT keys only for LEAN_MANY_ROWS x the slots in rows: at 128 sequences of up to 1k
# keys split-KV's grid of a program per row ran 1.08x (ragged) and 1.05x (equal) slower than stream-K, at 64 1.05x
# faster. That gives up stream-K's 4-5% at 8 sequences of up to 4k.
LEAN_MIN_CONTEXT = 2048
LEAN_MIN_KEYS_PER_SLOT = 1536
LEAN_MANY_ROWS = 3
# One program per SM for equal lengths (`deep_splits`): its tiles, and where it applies
# (5 stages: Triton 3.6 pipelines the table-then-K/V loads into two K/V buffers; three or four ran 0.8-5% slower, and
# HOST_BOUND 0.2-1.5% faster at 16 x 2k-32k: bench/tune_attention.py --gap round 5, 20261128T062422Z, T062851Z,
# T063800Z)
DEEP_DECODE = dict(BLOCK_N=64, num_warps=4, num_stages=5, HEADS_FASTEST=True, HOST_BOUND=True)
# On an H200 the H100's deep tiles ran 0.83-0.85x SDPA at 16 x 4k-128k; two 128-key tiles in flight (128 KiB, still
# one program per SM) 0.97-0.99x, where three 64-key tiles ran 0.84x, four 0.82x, two 64-key splits per row
# 0.93-0.97x, 8 warps 0.91-0.97x (bench/tune_attention.py --gap round 7, 20261128T175953Z)
DEEP_DECODE_H200 = {**DEEP_DECODE, "BLOCK_N": 128}
# On an H200, rows known equal that number at least WAVES_MIN_ROWS_PER_SM x the SMs run one program per row over
# several waves with `DEEP_DECODE`'s tiles (64 KiB of shared memory each, up to three per SM): 0.988 / 0.995x SDPA at
# 256 x 8k / 32k where stream-K ran 0.976 / 0.977x (round 7, T175953Z), 0.968 / 0.977x against 0.941 / 0.963x on a
# second lease (T182959Z); at 128 sequences (7.8 rows per SM) 0.975 / 0.966x against stream-K's 0.978 / 0.989x
WAVES_MIN_ROWS_PER_SM = 12
DEEP_MIN_FILL = 0.8
DEEP_MIN_KEYS = 2048
MAX_TICKETS = 1 << 14  # (sequence, kv head) pairs a fused-merge launch can count; larger batches merge separately
LEAN_MAX_SEQS = 1024  # sequences a stream-K launch takes (its programs hold every sequence's tile offset)


def decode_config(head_dim: int, dtype: torch.dtype, split: bool = False, programs: int = 0, tma: bool = False,
                  device: torch.device | None = None) -> dict:
    """BLOCK_N / num_warps / num_stages (and TMA) of the decode kernel (one small config under the interpreter).

    split: a launch whose keys are split (num_splits > 1); programs: its (sequence, kv head, split) work items;
    tma: the cache can be read by descriptors (`tma_capable`), on ``device``."""
    if is_interpreter():
        return dict(BLOCK_N=16, num_warps=1, num_stages=1, HEADS_FASTEST=True)
    if head_dim == 128 and dtype != torch.float32:
        slots = num_sms(device) if device is not None else 132
        # By programs per SM, on an H100 (bench/tune_attention.py --tma, 20261127T151205Z and T151715Z, batch
        # 16-256 over 8k-128k keys, CUDA graphs):
        if tma and programs > 4 * slots:
            # many waves: two TMA pages a tile, 6 stages. 1.000-1.001x SDPA at 256 x 8k (pointer tiles 0.993-0.996)
            # on the lease that tuned it, but 0.78-0.94x at 96-256 sequences on others (decode-many-rows-*.json):
            # equal-length batches of that many rows therefore take stream-K (`lean_pays_off`); this stays for
            # explicit split counts, short rows (<= LEAN_MIN_CONTEXT, under LEAN_MANY_ROWS waves), > LEAN_MAX_SEQS
            return dict(BLOCK_N=32, num_warps=4, num_stages=6, TMA=True, HEADS_FASTEST=True)
        if tma and programs > 2 * slots:
            # up to four programs per SM: one TMA page a tile, 2 warps, 6 stages (48 KiB). 1.007-1.014x SDPA at
            # 64 x 8k / 32k (pointer tiles 0.981-0.988). On an H200 8 stages (56 KiB, one page more in flight):
            # 1.006-1.010x SDPA at 64 x 8k / 32k / 128k where 6 stages ran 0.972-0.988x, 10 stages 0.982-0.990x
            # on one machine (bench/tune_attention.py --gap round 8, 20261129T053248Z), 0.972-0.978x against
            # 0.975-0.982x on another (T053755Z and a repeat): kept for the mean, the machine matters more
            stages = 8 if device is not None and is_h200(device) else 6
            return dict(BLOCK_N=16, num_warps=2, num_stages=stages, TMA=True, HEADS_FASTEST=True)
        if split or 0 < programs <= 2 * slots:
            # up to two programs per SM: 32-key tiles, 5 stages (80 KiB). At 16 x 8k / 32k / 128k split in two:
            # 0.969 / 1.001 / 1.002x SDPA (TMA tiles at best 0.970 / 1.003 / 1.008)
            return dict(BLOCK_N=32, num_warps=4, num_stages=5, HEADS_FASTEST=True)
    block_n = 64 if head_dim <= 128 else 32
    if dtype == torch.float32:
        block_n //= 2
    # HEADS_FASTEST: 0-1.2% faster on an H100 at batch 16-256, 8k-32k keys (bench/tune_attention.py --orders)
    return dict(BLOCK_N=block_n, num_warps=4, num_stages=3 if head_dim <= 128 else 2, HEADS_FASTEST=True)


def lean_config(head_dim: int, dtype: torch.dtype, device: torch.device | None = None) -> dict:
    """Tiles of a stream-K launch (two programs per SM, pointer loads): those of split-KV's up-to-two-per-SM launches.
    At 128 and 256 sequences over 8k / 32k keys (1024-2048 rows, one H100, CUDA graphs) they ran 1.001-1.008x SDPA
    where 64-key tiles, 3 stages ran 0.986-0.993x (bench/tune_attention.py --gap, 20261128T042122Z). On an H200 those
    ran 0.86-0.89x and 64-key tiles at 5 stages (two in flight, 128 KiB per SM) 0.976-0.989x; 32-key tiles at 7
    stages 0.86-0.87x, one 128-key program per SM 0.92x (round 7, 20261128T175953Z)."""
    cfg = decode_config(head_dim, dtype, split=True, device=device)
    if device is not None and cfg["BLOCK_N"] == 32 and is_h200(device):
        cfg = {**cfg, "BLOCK_N": 64}
    return {**cfg, "LEAN": True}


def decode_variants(head_dim: int, dtype: torch.dtype, device: torch.device, tma: bool) -> list[dict]:
    """Every config the automatic choice of `paged_decode_attention` can pick for these shapes (split or not, each
    programs-per-SM range, TMA or not, stream-K or not): what a warm-up compiles."""
    slots = num_sms(device)
    out: list[dict] = []
    for split in (False, True):
        for programs in (slots, 3 * slots, 5 * slots):  # <= 2, <= 4, > 4 programs per SM
            cfg = decode_config(head_dim, dtype, split, programs, tma, device)
            if cfg not in out:
                out.append(cfg)
    out.append(lean_config(head_dim, dtype, device))
    if deep_tuned(head_dim, dtype, device):
        out.append(deep_config(device))
        if is_h200(device):
            out.append(DEEP_DECODE)  # `waves_of_rows`
    return out


def deep_config(device: torch.device) -> dict:
    """Tiles of the one-program-per-SM schedule (`deep_splits`) on this GPU: `DEEP_DECODE`, `DEEP_DECODE_H200`."""
    return DEEP_DECODE_H200 if is_h200(device) else DEEP_DECODE


def deep_tuned(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `deep_config` was tuned for these shapes on this GPU (Hopper, head_dim 128, 16-bit)."""
    return not is_interpreter() and head_dim == 128 and dtype != torch.float32 and is_hopper(device)


def waves_of_rows(batch: int, num_kv_heads: int, max_context: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device) -> bool:
    """Whether rows known equal run one program each over several waves (`DEEP_DECODE`'s tiles, unsplit) rather
    than stream-K: on an H200, from `WAVES_MIN_ROWS_PER_SM` rows per SM, rows of at least `DEEP_MIN_KEYS` keys."""
    return (deep_tuned(head_dim, dtype, device) and is_h200(device) and max_context >= DEEP_MIN_KEYS
            and batch * num_kv_heads >= WAVES_MIN_ROWS_PER_SM * num_sms(device) and batch <= LEAN_MAX_SEQS)


def deep_splits(batch: int, num_kv_heads: int, max_context: int, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> int:
    """Split factor of the one-program-per-SM schedule (`deep_config`) for a batch of rows known to be equally
    long, or 0 where it does not apply.

    It applies where rows x splits (a power of two) fill `DEEP_MIN_FILL` to 1 x the SMs and every split keeps at
    least `DEEP_MIN_KEYS` keys: one program per SM (none beside it to hide a restart or a merge behind), two 64-key
    K/V tiles (64 KiB) in flight, its key loop spanning the host's bound of the lengths (HOST_BOUND: the block
    table is read beside seq_len, not after it). Hopper, head_dim 128, 16-bit only (where it
    was measured). SDPA's decode (cuDNN's flash kernel) is itself one program per (sequence, kv head) row, unsplit.
    On an H100 at 8 kv heads, CUDA graphs, against SDPA (bench/results/experiments/decode-deep-pipeline-*.json and
    the kernels tables at 8ac7ffe and ee3e4fd): 16 x 8k 0.991-1.006x over five leases (split-KV's two programs per
    SM 0.979-0.984x), 16 x 2k / 4k 0.991 / 0.993x (0.933 / 0.958x), 16 x 16k 0.986x (0.993x), 16 x 32k 1.003-1.015x
    (0.997-1.002x), 7 x 8k 1.020x (0.926x), 14 x 8k 0.969x (stream-K 0.930x), 4 x 8k 0.986x (0.957x), 4 x 32k
    1.019x (1.003x), 1 x 128k 1.014x (1.002x); at 12 x 8k (73% of the SMs) 0.845x against stream-K's 0.913x,
    hence the fill bound. Not for unknown lengths: the longest row would set the time (0.63-0.81x stream-K on
    ragged batches)."""
    if not deep_tuned(head_dim, dtype, device):
        return 0
    rows, sms = batch * num_kv_heads, num_sms(device)
    s = 1
    while s <= MAX_SPLITS and max_context >= s * DEEP_MIN_KEYS:
        if DEEP_MIN_FILL * sms <= rows * s <= sms:
            return s
        s *= 2
    return 0


def tma_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the caches are contiguous [num_blocks, block_size, Hkv, D] rows (the engine's layout), 16-byte
    aligned: what `tma_descriptors` needs."""
    nb, page, hkv, d = k_cache.shape
    return all(c.stride() == (page * hkv * d, hkv * d, d, 1) and c.data_ptr() % 16 == 0 for c in (k_cache, v_cache))


def tma_capable(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether decode reads these caches by TMA by default: Hopper, 16-bit, 16-token pages of head_dim 128 (the
    tuned case) in `tma_layout`."""
    return (k_cache.is_cuda and not is_interpreter() and is_hopper(k_cache.device) and k_cache.shape[1] == 16
            and k_cache.shape[3] == 128 and k_cache.dtype in (torch.float16, torch.bfloat16)
            and tma_layout(k_cache, v_cache))


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device, block_n: int) -> int:
    """Split-KV factor from shapes only (no host sync): the fewest splits (powers of two, each at least one key
    tile) that fill two resident programs per SM (one wave if that is well quantised, else as few as it takes).

    Fewer splits win ties: at batch 16 (128 (sequence, kv head) pairs) two splits, one wave, ran 2-4% faster than
    four, two waves (1xH100, bench/tune_attention.py --merge 20261127T122147Z, T123025Z, --tma T151715Z). Splits
    as short as one tile pay at batch 1-2: one sequence of 1k keys took 7.1 us in 32 splits (their merge a second
    launch) against 11.7 us in four of 256 keys, 512 keys 6.8 against 11.1 us (SDPA 6.9 / 7.3 us; CUDA graphs,
    bench/results/experiments/decode-short-contexts-*.json)."""
    work = batch * num_kv_heads
    cap = max(1, min(MAX_SPLITS, cdiv(max_context, block_n)))
    slots = 2 * num_sms(device)
    if work >= slots:
        return 1
    best, best_eff, s = 1, 0.0, 1
    while s <= cap:
        progs = work * s
        eff = progs / (math.ceil(progs / slots) * slots)
        if eff > best_eff + 0.02:
            best, best_eff = s, eff
        if progs >= slots and eff >= 0.85:  # a full wave or more, well quantised: more splits only add waves
            break
        s *= 2
    return best


def lean_pays_off(batch: int, num_kv_heads: int, num_splits: int, device: torch.device, uniform: bool,
                  max_context: int) -> bool:
    """Whether a decode runs stream-K (`decode_lean_kernel`) instead of split-KV by ``num_splits``; ``max_context``
    bounds the rows' lengths.

    Never for fewer rows (sequence, kv head) than a tenth of the two-per-SM program slots: a row would be cut into
    many pieces, merged one by one; nor for short batches (`LEAN_MIN_KEYS_PER_SLOT`, `LEAN_MIN_CONTEXT`). Otherwise
    always for batches of unequal or unknown lengths, the serving case: on 1xH100, 8 kv heads, lengths uniform in
    [512, 32k], stream-K ran 1.17-1.49x faster than split-KV from 4 to 128 sequences (0.87x at 2). For lengths known
    equal, only where the split launch fills its wave of programs badly
    (under 90%) or needs more than one, and the rows number at least a quarter of the slots: there stream-K ran
    1.02-1.05x SDPA against split-KV's 0.86-0.88x (24 sequences over 8k / 32k keys), while split-KV stays ahead where
    it fills one wave (16 x 8k: 0.98x SDPA against 0.93x). bench/tune_attention.py --lean, 20261127T154957Z and
    T155223Z. And for lengths known equal where the rows alone are more than four programs per SM (from 67 sequences
    at 8 kv heads), whose TMA tiles ran 0.77-0.94x SDPA at 96-256 x 4k-32k on one H100, 0.78-0.87x at 96-192 and
    0.999x at 256 on another, 1.00x at 256 on a third, where stream-K's device-side split partition ran 0.993-1.000x
    on the first and 0.982-0.991x on the second (bench/results/experiments/decode-many-rows-*.json), 0.998-1.006x on
    two more with `lean_config`'s tiles (kernels-20261128-043851.json, -044553.json)."""
    rows, slots = batch * num_kv_heads, 2 * num_sms(device)
    if 10 * rows < slots or batch > LEAN_MAX_SEQS or rows > MAX_TICKETS:
        return False
    if rows * max_context < LEAN_MIN_KEYS_PER_SLOT * slots:
        return False
    if max_context <= LEAN_MIN_CONTEXT and rows < LEAN_MANY_ROWS * slots:
        return False
    if not uniform:
        return True
    if rows > 2 * slots:
        return True
    programs = rows * num_splits
    return rows < slots and (programs > slots or programs < 0.9 * slots) and 4 * rows >= slots
