"""One engine instance under the mixed benchmark's requests, all at once (a check and a timing, not a test).

The long-context mix (short ShareGPT-like requests plus 16k-128k prompts) submitted in one batch to the offline
engine, greedy with fixed output lengths: hybrid steps with long cached prefixes, long decodes, the paths the
serving benchmarks take. Runs once per mode: hybrid steps through the POD fused kernel, through the two kernels
in sequence, and chosen per step (DeviceConfig.hybrid_attention); reports each run's time and whether
the greedy tokens agree (random weights give near-tied logits, so bf16 rounding differences between the fused and
the separate kernels may flip a token; a fault shows up here with the failing step, without Ray or gRPC).

    python bench/engine_stress.py --shape 8b              # GPU
    python bench/engine_stress.py --quick                 # CPU smoke run (tiny model, torch backend: one pass)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accordion import LLM, SamplingParams  # noqa: E402
from accordion.checkpoints import make_checkpoint  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402
from bench.serving.workloads import WorkloadConfig, generate  # noqa: E402

PRESETS = {"tiny": "tiny-llama", "1b": "llama-3.2-1b", "8b": "llama-3.1-8b"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=list(PRESETS))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--long-fraction", type=float, default=0.1)
    ap.add_argument("--long-min-len", type=int, default=16384)
    ap.add_argument("--long-max-len", type=int, default=131072)
    ap.add_argument("--max-model-len", type=int, default=131072 + 2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", default="fused,separate,auto",
                    help="hybrid attention: comma list of fused,separate,auto (a mode named again runs again)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if args.quick:
        args.shape, args.num_prompts, args.long_min_len, args.long_max_len, args.max_model_len = "tiny", 8, 256, 512, 1024
    work = Path(tempfile.mkdtemp(prefix="accordion-stress-"))
    ckpt = make_checkpoint(work / args.shape, PRESETS[args.shape], dtype="bfloat16" if cuda else "float32",
                           device="cuda" if cuda else "cpu",
                           **({"max_position_embeddings": args.max_model_len} if args.quick else {}))
    llm = LLM(str(ckpt), device="cuda" if cuda else "cpu", max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    reqs = generate(WorkloadConfig(name="long-context-mix", num_prompts=args.num_prompts, seed=args.seed,
                                   vocab_size=llm.tokenizer.vocab_size, max_model_len=args.max_model_len,
                                   long_fraction=args.long_fraction, long_min_len=args.long_min_len,
                                   long_max_len=args.long_max_len))
    prompts = [r.prompt_token_ids.tolist() for r in reqs]
    print("prompt lengths:", sorted(len(p) for p in prompts)[-5:], "output lengths max:", max(r.output_len for r in reqs),
          flush=True)
    params = [SamplingParams(max_tokens=r.output_len, min_tokens=r.output_len, ignore_eos=True, temperature=0)
              for r in reqs]
    backend = llm.instance.worker.backend
    modes = args.modes.split(",") if hasattr(backend, "fuse_hybrid") else [backend.name]
    rows, tokens, out = [], {}, {}
    for i, mode in enumerate(modes):
        if hasattr(backend, "fuse_hybrid"):
            backend.fuse_hybrid = {"fused": True, "separate": False, "auto": None}[mode]
        run = mode if mode not in modes[:i] else f"{mode}#{modes[:i].count(mode) + 1}"  # a mode named again: a rerun
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        tokens[run] = [o.outputs[0].token_ids for o in outs]
        n_out = sum(len(t) for t in tokens[run])
        out[run] = dict(seconds=dt, output_tokens=n_out, output_tok_s=n_out / dt)
        rows.append([run, f"{dt:.2f}", n_out, f"{n_out / dt:.0f}"])
    same = len({tuple(map(tuple, t)) for t in tokens.values()}) == 1
    lens = sorted(len(p) for p in prompts)
    path = write_result("engine-stress", dict(settings=vars(args), prompt_lens=lens, runs=out, same_tokens=same))
    print_table(rows, ["hybrid attention", "seconds", "output tokens", "output tok/s"])
    print(f"prompts: {len(prompts)}, longest {lens[-3:]}; all runs give the same tokens: {same}  ({path})")


if __name__ == "__main__":
    main()
