"""Operator commands: ``accordion scale`` resizes a running cluster's instance pool; ``accordion profile`` measures
the sequence-parallel prefill cost model (``T = A + B*sum(l) + C*sum(l^2)`` per degree) that ``accordion serve
--esp --esp-cost-model`` uses to choose how many instances prefill a prompt."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

from accordion.cluster.config import ClusterConfig, ESPConfig, cache_dir


def _connect(address: str | None, namespace: str) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    else:  # a private local cluster, as `accordion serve` starts it
        from accordion.serve import LOCAL_CLUSTER_OPTIONS

        ray.init(namespace=namespace, log_to_driver=False, **LOCAL_CLUSTER_OPTIONS)


# ---------------------------------------------------------------------------------------------------- scale
def add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=int, required=True, help="the number of serving instances wanted")
    p.add_argument("--ray-address", default="auto", help="the Ray cluster `accordion serve` runs on")
    p.add_argument("--namespace", default=ClusterConfig.__dataclass_fields__["namespace"].default)
    p.add_argument("--manager-name", default=ClusterConfig.__dataclass_fields__["manager_name"].default)
    p.add_argument("--no-drain", action="store_true", help="remove instances without waiting for their requests")
    p.add_argument("--timeout", type=float, default=60.0, help="drain timeout per removed instance, seconds")


def scale(manager, instances: int, *, drain: bool = True, timeout_s: float = 60.0) -> tuple[int, int]:
    """Add or remove (newest first, drained) instances until ``instances`` serve. Returns (before, after)."""
    import ray

    if instances < 1:
        raise ValueError("--instances must be at least 1")
    live = [r for r in ray.get(manager.list_instances.remote()) if r.routable]
    before = len(live)
    for _ in range(instances - before):
        ray.get(manager.add_instance.remote())
    for rec in reversed(live[instances:]):
        ray.get(manager.remove_instance.remote(rec.instance_id, drain, timeout_s))
    after = sum(1 for r in ray.get(manager.list_instances.remote()) if r.routable)
    return before, after


def scale_main(args: argparse.Namespace) -> int:
    import ray

    _connect(args.ray_address, args.namespace)
    manager = ray.get_actor(args.manager_name, namespace=args.namespace)
    before, after = scale(manager, args.instances, drain=not args.no_drain, timeout_s=args.timeout)
    print(f"instances: {before} -> {after}")
    return 0 if after == args.instances else 1


# ---------------------------------------------------------------------------------------------------- profile
def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2")
    p.add_argument("--num-instances", type=int, default=None, help="default: one per GPU, else 2 CPU instances")
    p.add_argument("--lengths", default="1024,4096,16384", help="prompt lengths to time")
    p.add_argument("--degrees", default=None, help="degrees to time (default 1,2,4,... up to the instances)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=None, help="cost model JSON (default: in the accordion cache directory)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--ray-address", default=None)


def default_cost_model_path(model_path: str) -> Path:
    return cache_dir() / f"esp-cost-{Path(model_path).name}.json"


async def profile_prefill(engine, lengths: list[int], degrees: list[int], reps: int, vocab: int,
                          seed: int = 0) -> list[tuple[int, list[int], float]]:
    """Time prompt -> first token per (degree, length) through a RayEngineClient with elastic SP on.
    Degree 1 is the one-instance chunked prefill. Returns (degree, [length], seconds) samples."""
    from accordion.cluster.request import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_tokens=1, temperature=0)
    samples = []
    for degree in degrees:
        engine.esp.force_degree = degree if degree > 1 else None
        engine.esp.min_prompt_tokens = 1 if degree > 1 else 1 << 40
        for length in lengths:
            for rep in range(reps + 1):  # rep 0 warms up
                prompt = [rng.randrange(10, vocab) for _ in range(length)]
                t0 = time.perf_counter()
                async for _ in engine.generate(f"profile-{degree}-{length}-{rep}", prompt, params):
                    pass
                if rep:
                    samples.append((degree, [length], time.perf_counter() - t0))
    return samples


def profile_main(args: argparse.Namespace) -> int:
    import ray

    from accordion.cluster.esp_planner import PrefillCostModel
    from accordion.cluster.global_manager import start_manager
    from accordion.cluster.ray_engine import RayEngineClient
    from accordion.default_model import resolve_model
    from accordion.serve import engine_config_from_args

    lengths = [int(x) for x in args.lengths.split(",")]
    ns = argparse.Namespace(model=resolve_model(args.model), dtype=args.dtype, max_model_len=max(lengths) + 16,
                            block_size=16, num_blocks=None, gpu_memory_utilization=0.9,
                            max_num_batched_tokens=2048, max_num_seqs=16, device=args.device)
    ec = engine_config_from_args(ns)
    _connect(args.ray_address, "accordion-profile")
    gpus = int(ray.cluster_resources().get("GPU", 0)) if args.device != "cpu" else 0
    n = args.num_instances or gpus or 2
    degrees = [int(x) for x in args.degrees.split(",")] if args.degrees else \
        [d for d in (1, 2, 4, 8, 16) if d <= n]
    esp = ESPConfig(enabled=True, max_degree=max(degrees))
    cc = ClusterConfig(engine=ec, esp=esp, namespace="accordion-profile", manager_name="accordion-profiler",
                       gpus_per_instance=1.0 if gpus else 0.0, cpus_per_instance=1.0 if gpus else 0.5,
                       cpu_threads_per_instance=args.cpu_threads)
    manager = start_manager(cc)

    async def run():
        await manager.start.remote(n)
        engine = await RayEngineClient.create(manager, ec, esp=esp)
        try:
            await engine.wait_for_instances(n, timeout_s=cc.start_timeout_s)
            return await profile_prefill(engine, lengths, degrees, args.reps, engine.model_info().vocab_size)
        finally:
            await engine.close()
            await manager.shutdown.remote()

    try:
        samples = asyncio.run(run())
    finally:
        ray.kill(manager, no_restart=True)
    model = PrefillCostModel.fit(samples)
    out = Path(args.out) if args.out else default_cost_model_path(ec.model.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    print(f"{'degree':>6} {'tokens':>8} {'measured s':>11} {'model s':>9}")
    for degree, ls, secs in samples:
        print(f"{degree:>6} {ls[0]:>8} {secs:>11.4f} {model.predict(degree, ls):>9.4f}")
    print(f"wrote {out}")
    return 0
