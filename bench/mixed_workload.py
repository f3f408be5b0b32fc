"""Elastic sequence parallelism versus static instances on a mixed workload (LoongServe's headline comparison).

The same N devices are served twice, one after the other, with the same random-weight checkpoint and the same
requests (short ShareGPT-like prompts plus a fraction of long ones, Poisson arrivals):

* ``static``: ``accordion serve --num-instances N``: N independent chunked-prefill instances behind the
  least-loaded router;
* ``esp``: the same plus ``--esp``: long prompts are prefilled across several instances (ring attention,
  proactive scale-down), the degree chosen by the cost model.

Each mode replays the prompts at the same fixed Poisson rates (``--rates``); its capacity is the highest rate at
which it, and every lower rate, met the p99 TTFT and p99 TPOT SLOs. ``--find-max-rate LO,HI`` bisects instead
(``bench/serve.py --find-max-rate``). Prints both capacities, their ratio, and per mode the completed over the
offered rate at its capacity (near 1 when the servers kept up); writes ``bench/results/mixed-workload-*.json``.

    python bench/mixed_workload.py --shape 8b --num-instances 4 --num-prompts 96 --long-fraction 0.25 \\
        --long-min-len 16384 --long-max-len 131072 --slo ttft:20000 tpot:150 --rates 0.75,1,1.5,2
    python bench/mixed_workload.py --quick      # CPU smoke run: tiny model, 2 CPU instances

The TTFT SLO is 1.5x the single-GPU prefill of a 128k prompt (13.2 s on H100); a quarter of the requests are long.
Short runs measure bursts, not rates: on 4xH200 (45cbd93) static instances "met the SLOs" up to 3.1 req/s offered
with 48 requests while completing only 1.2-1.4 req/s, and the bisection was not even monotonic (2.25 and 3.125
passed, 3.56 failed). Hence fixed rates below the ~1.9 req/s that static mode drains at an unbounded rate, and 96
requests per rate (0.75 req/s: 128 s). One mode takes 7-9 minutes with start-up and warm-up, so run one mode per
10-minute device call (``--modes static``, then ``--modes esp`` on the same still-warm machine, or the same card
type) and compare the two JSON files. The server runs without prefix caching: every rate replays the same prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accordion.checkpoints import make_checkpoint  # noqa: E402
from bench.common import free_port, print_table, start_server, stop_server, write_result  # noqa: E402
from bench.serving.metrics import parse_slos  # noqa: E402
from bench.serving.runner import meets_capacity_slo  # noqa: E402

PRESETS = {"tiny": "tiny-llama", "1b": "llama-3.2-1b", "8b": "llama-3.1-8b"}
MODES = ("static", "esp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8b", choices=list(PRESETS))
    p.add_argument("--num-instances", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=131072 + 2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--esp-min-tokens", type=int, default=16384)
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--long-fraction", type=float, default=0.25)
    p.add_argument("--long-min-len", type=int, default=16384)
    p.add_argument("--long-max-len", type=int, default=131072)
    p.add_argument("--slo", nargs="*", default=["ttft:20000", "tpot:150"], metavar="NAME:MS")
    p.add_argument("--rates", default="0.75,1,1.5,2", help="comma list of req/s, the same for every mode")
    p.add_argument("--find-max-rate", default=None, metavar="LO,HI", help="bisect in [LO,HI] instead of --rates")
    p.add_argument("--search-iters", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES), help="comma list of static,esp")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU instances, small lengths")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.num_instances, args.max_model_len, args.num_prompts = "tiny", 2, 1024, 12
        args.long_min_len, args.long_max_len, args.esp_min_tokens, args.long_fraction = 256, 512, 200, 0.25
        args.slo, args.rates = ["ttft:60000", "tpot:5000"], "1,4"
    return args


def serve_command(path: str, port: int, mode: str, args) -> list[str]:
    cmd = [sys.executable, "-m", "accordion.cli", "serve", "--model", path, "--port", str(port), "--num-instances",
           str(args.num_instances), "--max-model-len", str(args.max_model_len), "--max-num-batched-tokens",
           str(args.max_num_batched_tokens), "--no-enable-prefix-caching"]  # probes replay the same prompts
    if not torch.cuda.is_available():
        cmd += ["--device", "cpu"]
    if mode == "esp":
        cmd += ["--esp", "--esp-min-tokens", str(args.esp_min_tokens), "--esp-max-degree", str(args.num_instances)]
    return cmd


def sustained_capacity(points: list[dict], slo_ms: dict[str, float]) -> dict:
    """Capacity from a fixed-rate sweep: the highest rate at which it and every lower rate met the p99 SLOs.

    ``points``: ``bench/serve.py`` metrics, one per rate. Returns the shape of a capacity search:
    ``{"max_rate": float | None, "slo": ..., "percentile": 99.0, "probes": [{"rate", "ok"}, ...]}``.
    """
    probes = sorted(({"rate": pt["request_rate"], "ok": meets_capacity_slo(pt, slo_ms)} for pt in points),
                    key=lambda pr: pr["rate"])
    max_rate = None
    for pr in probes:
        if not pr["ok"]:
            break
        max_rate = pr["rate"]
    return {"max_rate": max_rate, "slo": dict(slo_ms), "percentile": 99.0, "probes": probes}


def capacity(target: str, mode: str, out_dir: Path, args) -> dict:
    """``bench/serve.py`` at ``--rates`` (or ``--find-max-rate``) against a running server; its result JSON, with
    ``capacity_search`` filled in either way."""
    search = (["--find-max-rate", args.find_max_rate, "--search-iters", str(args.search_iters)] if args.find_max_rate
              else ["--request-rate", args.rates])
    cmd = [sys.executable, str(Path(__file__).parent / "serve.py"), "--target", target, "--workload",
           "long-context-mix", "--num-prompts", str(args.num_prompts), "--long-fraction", str(args.long_fraction),
           "--long-min-len", str(args.long_min_len), "--long-max-len", str(args.long_max_len), *search,
           "--label", f"mixed-{mode}", "--result-dir", str(out_dir), "--slo", *args.slo]
    env = {**os.environ, "OUT": ""}
    # Warm-up pass (discarded): the first long prompts compile kernels for new shapes, which would otherwise land
    # in the first probe's TTFT (seen on 2×H100: p50 5.6 s at the first rate, 0.2 s after).
    warm = [c if c != f"mixed-{mode}" else f"mixed-warmup-{mode}" for c in cmd]
    i = warm.index(search[0])
    warm[i:i + len(search)] = ["--request-rate", "inf", "--seed", "1"]  # other prompts than the measured ones
    subprocess.run(warm, check=True, env=env)
    subprocess.run(cmd, check=True, env=env)
    files = sorted(out_dir.glob(f"serve-mixed-{mode}-*.json"))
    res = json.loads(files[-1].read_text())
    if "capacity_search" not in res:
        res["capacity_search"] = sustained_capacity(res["points"], parse_slos(args.slo))
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="accordion-mixed-"))
    ckpt = str(make_checkpoint(work / args.shape, PRESETS[args.shape], dtype="bfloat16" if cuda else "float32",
                               device="cuda" if cuda else "cpu",
                               **({"max_position_embeddings": args.max_model_len} if args.quick else {})))
    results, rows = {}, []
    for mode in args.modes.split(","):
        port = free_port()
        proc = start_server(serve_command(ckpt, port, mode, args), port, work / f"server-{mode}.log")
        try:
            res = capacity(f"127.0.0.1:{port}", mode, work, args)
        finally:
            stop_server(proc)
        search = res.get("capacity_search", {})
        max_rate = search.get("max_rate")
        best = next((pt for pt in res["points"] if pt["request_rate"] == max_rate), None)  # the point at capacity
        kept_up = best and best["request_throughput"] / best["request_rate"]
        results[mode] = {"max_rate": max_rate, "at_max_rate": best, "completed_over_offered": kept_up,
                         "probes": search.get("probes"), "points": res["points"], "workload": res.get("workload")}
        rows.append([mode, max_rate, kept_up, best and best.get("p99_ttft_ms"), best and best.get("p99_tpot_ms"),
                     best and best.get("output_throughput")])
    ratio = None
    if all(results.get(m, {}).get("max_rate") for m in MODES):
        ratio = results["esp"]["max_rate"] / results["static"]["max_rate"]
    path = write_result("mixed-workload", {"settings": vars(args), "results": results, "esp_over_static": ratio})
    print_table(rows, ["mode", "max req/s under SLOs", "completed/offered", "p99 TTFT ms", "p99 TPOT ms",
                       "output tok/s"])
    print(f"elastic SP / static capacity: {ratio if ratio is None else f'{ratio:.2f}x'}  ({path})")
    return results


if __name__ == "__main__":
    main()
