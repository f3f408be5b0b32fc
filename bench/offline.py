"""Offline benchmark: accordion ``LLM`` vs Hugging Face transformers on random-weight Llama checkpoints.

(a) throughput, 1B shape: 64 prompts x 512 random token ids in, 128 out (greedy, ignore_eos); output tok/s for
    accordion, transformers ``generate_batch`` (continuous batching) and padded ``generate``.
(b) batch-1 decode, 1B and 8B shapes: 128-token prompt, 256 out; TTFT, decode tok/s and memory-bandwidth
    utilisation = (weight bytes read per step + mean KV bytes per step) x tok/s / measured copy bandwidth.

    python bench/offline.py                       # GPU, both phases, both shapes (~5 min on an H100)
    python bench/offline.py --quick --device cpu  # tiny-llama smoke run, float32 on CPU

Results: ``bench/results/offline-<gpu>-<utc>.json`` (and ``$OUT/`` if set), a table last.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import hf_baseline  # noqa: E402

from accordion.checkpoints import build_config, make_checkpoint, weight_bytes  # noqa: E402

SHAPES = {"1b": "llama-3.2-1b", "8b": "llama-3.1-8b"}
QUICK_SHAPES = {"1b": ("tiny-llama", {}), "8b": ("tiny-llama", {"num_hidden_layers": 4, "hidden_size": 128})}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["throughput", "decode", "all"], default="all")
    p.add_argument("--shapes", default="1b,8b", help="comma list of 1b,8b (decode phase; throughput uses 1b)")
    p.add_argument("--skip-hf", action="store_true", help="accordion only")
    p.add_argument("--compare-torch-backend", action="store_true",
                   help="also run the throughput phase on the torch attention backend")
    p.add_argument("--skip-accordion", action="store_true", help="HF only")
    p.add_argument("--compare-async", action="store_true",
                   help="throughput phase: also run accordion with async scheduling switched the other way")
    p.add_argument("--quick", action="store_true", help="tiny-llama, tiny sizes: a smoke run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--ckpt-dir", default=None, help="keep/reuse checkpoints here (default: a temp dir)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--decode-input-len", type=int, default=128)
    p.add_argument("--decode-output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    if a.quick:
        a.num_prompts, a.input_len, a.output_len = min(a.num_prompts, 8), min(a.input_len, 64), min(a.output_len, 16)
        a.decode_input_len, a.decode_output_len = min(a.decode_input_len, 32), min(a.decode_output_len, 32)
        a.max_num_seqs, a.max_model_len = min(a.max_num_seqs, 8), min(a.max_model_len, 512)
        a.max_num_batched_tokens = min(a.max_num_batched_tokens, 512)
    return a


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` lists of ``length`` ids in [5, vocab): no special tokens (ids 0..4), every id decodable."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n, length), generator=g).tolist()


def get_checkpoint(shape: str, args, root: Path) -> tuple[Path, dict]:
    """Create (or reuse, if its config.json exists) the checkpoint for ``shape``; return path and info."""
    preset, overrides = QUICK_SHAPES[shape] if args.quick else (SHAPES[shape], {})
    path = root / f"{preset}-{args.dtype}{'-' + shape if args.quick else ''}"
    t0 = time.perf_counter()
    reused = (path / "config.json").exists()
    if not reused:
        make_checkpoint(path, preset, dtype=args.dtype, seed=args.seed,
                        device="cuda" if args.device.startswith("cuda") else "cpu", **overrides)
    cfg = build_config(preset, dtype=args.dtype, **overrides)
    info = {"preset": preset, "overrides": overrides, "path": str(path), "reused": reused,
            "create_s": None if reused else round(time.perf_counter() - t0, 2), "weight_bytes": weight_bytes(path)}
    print(f"[ckpt] {shape}: {info}", flush=True)
    return path, info | {"config": cfg}


def traffic_per_step(cfg: dict, total_weight_bytes: int, ctx_len: float, itemsize: int) -> dict:
    """Bytes a batch-1 decode step must read: every weight once (an untied embedding table is only gathered, one
    row, so it is left out; a tied one is read whole as the LM head) plus K and V of ``ctx_len`` positions."""
    embed = cfg["vocab_size"] * cfg["hidden_size"] * itemsize
    weights = total_weight_bytes - (0 if cfg["tie_word_embeddings"] else embed)
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * itemsize * ctx_len
    return {"weight_bytes_per_step": weights, "kv_bytes_per_step": kv, "bytes_per_step": weights + kv}


# --------------------------------------------------------------------------------------------------- accordion
def make_llm(path: Path, args, **overrides):
    from accordion import LLM

    kw = dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    return LLM(model=str(path), **{**kw, **overrides})


def close_llm(llm) -> None:
    for name in ("shutdown", "close"):
        if callable(getattr(llm, name, None)):
            getattr(llm, name)()
            break


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def accordion_throughput(path: Path, prompts, warm_prompts, args, **overrides) -> dict:
    from accordion import SamplingParams

    llm = make_llm(path, args, **overrides)
    try:
        sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        llm.generate(warm_prompts, sp)  # warm-up (other tokens than the timed prompts: no prefix-cache hits)
        _sync(args.device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        _sync(args.device)
        wall = time.perf_counter() - t0
        toks = [list(o.outputs[0].token_ids) for o in outs]
        n = sum(len(t) for t in toks)
        return {"engine": "accordion", "num_prompts": len(prompts), "generated_tokens": n, "wall_s": wall,
                "output_tok_s": n / wall, "all_full_length": all(len(t) == args.output_len for t in toks),
                "first_output": toks[0]}
    finally:
        close_llm(llm)
        llm = None  # free the GPU memory before the next phase
        free_memory()


def accordion_decode(path: Path, prompt, ttft_prompts, warm_prompt, args) -> dict:
    """Batch-1: TTFT = median time of ``max_tokens=1`` calls; decode tok/s = (n - 1) / (time(n tokens) - TTFT)."""
    from accordion import SamplingParams

    llm = make_llm(path, args)
    try:
        def timed(p, n):
            sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            _sync(args.device)
            t0 = time.perf_counter()
            out = llm.generate([p], sp)
            _sync(args.device)
            return time.perf_counter() - t0, list(out[0].outputs[0].token_ids)

        timed(warm_prompt, 16)
        ttft = statistics.median(timed(tp, 1)[0] for tp in ttft_prompts)  # distinct prompts: no prefix-cache hits
        total, toks = timed(prompt, args.decode_output_len)
        return {"engine": "accordion", "prompt_len": len(prompt), "output_len": len(toks), "ttft_s": ttft,
                "total_s": total, "decode_tok_s": (args.decode_output_len - 1) / max(total - ttft, 1e-9),
                "first_output": toks}
    finally:
        close_llm(llm)
        llm = None  # free the GPU memory before the next phase
        free_memory()


def hf_cb_config(args):
    """transformers' ContinuousBatchingConfig: auto-sized on a GPU; small and fixed on CPU, where auto-sizing from
    host memory makes each generate_batch call take ~40 s."""
    if args.device.startswith("cuda"):
        return None
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=args.max_num_batched_tokens)


def guarded(label: str, fn, *a, **kw) -> dict:
    """Run one measurement; a failure is recorded (and printed) instead of ending the whole benchmark."""
    print(f"[run] {label} ...", flush=True)
    try:
        res = fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - a broken engine must not lose the other numbers
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
    free_memory()
    print(f"[run] {label}: { {k: v for k, v in res.items() if k != 'first_output'} }", flush=True)
    return res


def load_hf(path: Path, args, record: dict):
    """The HF model, or None with the failure recorded under ``record["hf_load_error"]``."""
    try:
        return hf_baseline.load_hf_model(path, args.dtype, args.device)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        record["hf_load_error"] = f"{type(e).__name__}: {e}"
        free_memory()
        return None


def common_prefix(a, b) -> int | None:
    if not a or not b:
        return None
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> dict:
    args = parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    env = common.env_info()
    print(f"[env] {env}", flush=True)
    tmp = None if args.ckpt_dir else tempfile.TemporaryDirectory(prefix="accordion-bench-")
    root = Path(args.ckpt_dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"throughput": {}, "decode": {}}
    ckpts: dict = {}
    rows = []
    try:
        if args.only in ("throughput", "all"):
            path, ckpts["1b"] = get_checkpoint("1b", args, root)
            vocab = ckpts["1b"]["config"]["vocab_size"]
            prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed + 1)
            warm = random_prompts(args.num_prompts, args.input_len, vocab, args.seed + 2)
            r = results["throughput"]
            if not args.skip_accordion:
                r["accordion"] = guarded("accordion throughput", accordion_throughput, path, prompts, warm, args)
                if args.compare_torch_backend and args.device.startswith("cuda"):
                    # The torch attention backend (gather + matmul, not graph-capturable): issue 4's comparison.
                    r["accordion_torch_backend"] = guarded(
                        "accordion throughput (torch attention backend)", accordion_throughput, path, prompts, warm,
                        args, attention_backend="torch", cuda_graphs=False)
                if args.compare_async:
                    from accordion.cluster.config import SchedulerConfig

                    other = not SchedulerConfig().async_scheduling
                    r[f"accordion_async_{'on' if other else 'off'}"] = guarded(
                        "accordion throughput (other loop)", accordion_throughput, path, prompts, warm, args,
                        async_scheduling=other)
            model = None if args.skip_hf else load_hf(path, args, r)
            if model is not None:
                r["hf_generate_batch"] = guarded("hf generate_batch", hf_baseline.hf_generate_batch_throughput,
                                                 model, prompts, args.output_len, warmup_prompts=warm,
                                                 cb_config=hf_cb_config(args))
                r["hf_generate"] = guarded("hf generate", hf_baseline.hf_generate_throughput, model, prompts,
                                           args.output_len, pad_token_id=model.config.pad_token_id or 0)
                hf_baseline.free_model(model)
                model = None  # free the GPU memory before the next phase
                free_memory()
            acc = r.get("accordion", {})
            for hf_name in ("hf_generate_batch", "hf_generate"):
                hf = r.get(hf_name, {})
                if acc.get("output_tok_s") and hf.get("output_tok_s"):
                    r[f"ratio_accordion_over_{hf_name}"] = acc["output_tok_s"] / hf["output_tok_s"]
                    r[f"greedy_common_prefix_prompt0_vs_{hf_name}"] = common_prefix(acc.get("first_output"),
                                                                                   hf.get("first_output"))
            for name, res in r.items():
                if isinstance(res, dict):
                    rows.append(["throughput", "1b", name, res.get("output_tok_s"), None, None, res.get("error")])

        if args.only in ("decode", "all"):
            bw = common.measure_copy_bandwidth(args.device, nbytes=(64 << 20) if args.quick else (2 << 30))
            results["copy_bandwidth_gb_s"] = bw
            itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
            for shape in shapes:
                path, ckpts[shape] = get_checkpoint(shape, args, root)
                cfg = ckpts[shape]["config"]
                p, wp, *tps = random_prompts(5, args.decode_input_len, cfg["vocab_size"], args.seed + 10)
                # Mean context over the decode steps: step j (1..n-1) attends over prompt + j positions.
                ctx = args.decode_input_len + args.decode_output_len / 2
                traffic = traffic_per_step(cfg, ckpts[shape]["weight_bytes"], ctx, itemsize)
                r = results["decode"][shape] = {"traffic": traffic}
                if not args.skip_accordion:
                    r["accordion"] = guarded(f"accordion decode {shape}", accordion_decode, path, p, tps, wp, args)
                model = None if args.skip_hf else load_hf(path, args, r)
                if model is not None:
                    r["hf_generate"] = guarded(f"hf decode {shape}", hf_baseline.hf_decode_tok_s, model, p,
                                               args.decode_output_len, pad_token_id=model.config.pad_token_id or 0)
                    model = None  # free the GPU memory before the next phase
                    free_memory()
                if r.get("accordion") and r.get("hf_generate"):
                    r["greedy_common_prefix"] = common_prefix(r["accordion"].get("first_output"),
                                                              r["hf_generate"].get("first_output"))
                for name in ("accordion", "hf_generate"):
                    res = r.get(name)
                    if res and res.get("decode_tok_s"):
                        res["bw_util"] = traffic["bytes_per_step"] * res["decode_tok_s"] / (bw * 1e9)
                    if res:
                        rows.append(["decode", shape, name, res.get("decode_tok_s"), res.get("ttft_s"),
                                     res.get("bw_util"), res.get("error")])
    finally:
        if tmp is not None:
            tmp.cleanup()
    settings = {k: v for k, v in vars(args).items()}
    ckpt_info = {k: {kk: vv for kk, vv in v.items() if kk != "config"} for k, v in ckpts.items()}
    out = common.write_result("offline", {"settings": settings, "checkpoints": ckpt_info, "results": results,
                                          "env": env})
    print(f"[result] {out}")
    common.print_table(rows, ["phase", "shape", "engine", "tok/s", "ttft_s", "bw_util", "error"])
    for hf_name in ("hf_generate_batch", "hf_generate"):
        ratio = results["throughput"].get(f"ratio_accordion_over_{hf_name}")
        if ratio is not None:
            print(f"throughput accordion / HF {hf_name.removeprefix('hf_')}: {ratio:.2f}x")
    return results


if __name__ == "__main__":
    main()
