"""The sweeps behind the kernels' tiles and schedules, one module a family, run by `bench/tune_attention.py`:
`decode_tiles` (tile sizes, split factors, merge placement, TMA pages, stream-K), `decode_schedules` (short and
equal-length batches, the cells below SDPA), `offsets` (int32 against int64 K/V offsets), `prefill` (prefill tiles)
and `hybrid` (POD kernels against the two kernels in sequence or on two streams)."""
