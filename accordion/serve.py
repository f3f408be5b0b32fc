"""``accordion serve``: the gRPC API over engine instances on a Ray cluster (or one in-process engine).

Startup: build the :class:`EngineConfig` and :class:`GrpcServeConfig` from flags, start (or join) Ray, start the
global manager and its instances, wrap them in a :class:`RayEngineClient`, start the gRPC server, print the
listening address. SIGTERM/SIGINT drain: health NOT_SERVING, new RPCs UNAVAILABLE, in-flight streams get the
grace period; then the instances shut down and the command exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from accordion.cluster.config import (
    CacheConfig,
    ClusterConfig,
    DeviceConfig,
    EngineConfig,
    ESPConfig,
    ModelConfig,
    SchedulerConfig,
)
from accordion.cluster.grpc_server import GrpcServeConfig, build_server, install_signal_handlers

logger = logging.getLogger(__name__)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``accordion serve``."""
    p.add_argument("--model", default="smollm2", help="HF checkpoint directory, or the alias 'smollm2'")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback requires an API key)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one)")
    g.add_argument("--api-key", default=None, help="require 'authorization: Bearer KEY' on every RPC")
    g.add_argument("--api-key-file", default=None, help="read the API key from this file")
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain (turns TLS on, with --tls-key)")
    g.add_argument("--tls-key", default=None, help="PEM private key")
    g.add_argument("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates (mTLS)")
    g.add_argument("--metrics-port", type=int, default=None, help="Prometheus endpoint port (0: any free port)")
    g.add_argument("--drain-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    c = p.add_argument_group("cluster")
    c.add_argument("--num-instances", type=int, default=None,
                   help="engine instances (default: one per GPU, else 1 CPU instance)")
    c.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    c.add_argument("--no-ray", action="store_true", help="one engine in this process, no Ray")
    c.add_argument("--auto-grow", action="store_true",
                   help="add an instance whenever a GPU frees up or a GPU node joins (Ray autoscaler, KubeRay)")
    c.add_argument("--cpu-threads", type=int, default=1, help="torch threads per CPU instance")
    sp = p.add_argument_group("elastic sequence parallelism")
    sp.add_argument("--esp", action="store_true", help="prefill long prompts across several instances")
    sp.add_argument("--esp-min-tokens", type=int, default=8192, help="shorter prompts stay on one instance")
    sp.add_argument("--esp-max-degree", type=int, default=8, help="most instances one prefill may span")
    sp.add_argument("--esp-force-degree", type=int, default=None, help="always use this degree (benchmarks)")
    sp.add_argument("--esp-cost-model", default=None, help="prefill cost model JSON from `accordion profile`")
    sp.add_argument("--esp-multi-master", action=argparse.BooleanOptionalAction, default=True,
                    help="decode a long request whose KV fits on no single instance with its KV spread over several")
    e = p.add_argument_group("engine")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton kernels on CUDA, torch on CPU")
    e.add_argument("--hybrid-attention", default="auto", choices=["auto", "separate", "fused"],
                   help="steps with prefill chunks and decodes: two kernels in sequence, the POD fused kernel, "
                        "or fused only for balanced steps on sm_90")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-num-batched-tokens", type=int, default=2048)
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--num-blocks", type=int, default=None)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt prefixes seen before")
    e.add_argument("--max-out-of-order", type=int, default=0,
                   help="requests that may be admitted past a queue head that does not fit (0: strict FCFS)")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch the next greedy decode step before reading back the current one "
                        f"(default: {'on' if SchedulerConfig.async_scheduling else 'off'})")
    e.add_argument("--engine-switch-interval-us", type=float, default=SchedulerConfig.engine_thread_switch_interval_us,
                   help="sys.setswitchinterval of the engine processes, in microseconds (0: Python's 5 ms)")


def _switch_interval(args: argparse.Namespace) -> float | None:
    us = getattr(args, "engine_switch_interval_us", SchedulerConfig.engine_thread_switch_interval_us)
    return None if not us else us


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    from accordion.default_model import resolve_model

    return EngineConfig(
        model=ModelConfig(model=resolve_model(args.model), dtype=args.dtype, max_model_len=args.max_model_len),
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          enable_prefix_caching=getattr(args, "enable_prefix_caching", True)),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                                  async_scheduling=(SchedulerConfig.async_scheduling
                                                    if getattr(args, "async_scheduling", None) is None
                                                    else args.async_scheduling),
                                  max_out_of_order=getattr(args, "max_out_of_order", 0),
                                  engine_thread_switch_interval_us=_switch_interval(args)),
        device=DeviceConfig(device=args.device, attention_backend=getattr(args, "attention_backend", "auto"),
                            hybrid_attention=getattr(args, "hybrid_attention", "auto")),
    )


def grpc_config_from_args(args: argparse.Namespace) -> GrpcServeConfig:
    key = args.api_key
    if args.api_key_file:
        if key:
            raise ValueError("give --api-key or --api-key-file, not both")
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"{args.api_key_file} is empty")
    return GrpcServeConfig(host=args.host, port=args.port, api_key=key or None, tls_cert=args.tls_cert,
                           tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, metrics_port=args.metrics_port,
                           drain_grace_s=args.drain_grace)


LOCAL_CLUSTER_OPTIONS = dict(include_dashboard=False, _node_ip_address="127.0.0.1",
                             _system_config={"prestart_worker_first_driver": False})
"""``ray.init`` options of the private local cluster: no dashboard, loopback, and none of the one-per-CPU idle
workers Ray prestarts (the manager and instances ask for their own niceness, so they never use them; 16 of them
importing Ray on an H100 node competed with the engines warming up)."""


def _init_ray(address: str | None, namespace: str) -> None:
    import ray

    if address:
        ray.init(address=address, namespace=namespace)
    else:  # a private local cluster (never an existing one on this machine)
        ray.init(address="local", namespace=namespace, **LOCAL_CLUSTER_OPTIONS)
        exposed = ray_wildcard_listeners()
        if exposed:
            logger.warning(
                "Ray listens on all network interfaces on %d port(s) (%s) although it was given 127.0.0.1: Ray %s "
                "cannot bind its servers to loopback. Its token authentication is on; firewall these ports or run "
                "on a private network (deploy/README.md).", len(exposed),
                ", ".join(f"{name}:{port}" for port, name in exposed[:8]) + (", ..." if len(exposed) > 8 else ""),
                ray.__version__)


def ray_wildcard_listeners() -> list[tuple[int, str]]:
    """(port, process name) of every TCP listener on a wildcard address (0.0.0.0 / ::) owned by this process or
    its descendants (the Ray cluster it started). Empty when that cannot be read."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        me = psutil.Process()
        ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
        found = set()
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.pid in ours and c.laddr.ip in ("0.0.0.0", "::"):
                found.add((c.laddr.port, psutil.Process(c.pid).name()))
        return sorted(found)
    except (psutil.Error, OSError):
        return []


async def _serve_ray(args: argparse.Namespace, ec: EngineConfig, gcfg: GrpcServeConfig) -> None:
    import ray

    from accordion.cluster.global_manager import start_manager
    from accordion.cluster.ray_engine import RayEngineClient

    gpus = int(ray.cluster_resources().get("GPU", 0)) if args.device != "cpu" else 0
    n = args.num_instances or gpus or 1
    esp = ESPConfig(enabled=args.esp, min_prompt_tokens=args.esp_min_tokens, max_degree=args.esp_max_degree,
                    force_degree=args.esp_force_degree, cost_model_path=args.esp_cost_model,
                    multi_master=args.esp_multi_master)
    cc = ClusterConfig(engine=ec, esp=esp, gpus_per_instance=1.0 if gpus else 0.0,
                       cpu_threads_per_instance=args.cpu_threads, auto_grow=args.auto_grow,
                       direct_host=None if args.ray_address else "127.0.0.1")  # a private cluster: loopback
    manager = start_manager(cc)
    engine = None
    try:
        await manager.start.remote(n)
        engine = await RayEngineClient.create(manager, ec, esp=esp)
        await engine.wait_for_instances(n, timeout_s=cc.start_timeout_s)
        await _run_grpc(engine, gcfg, f"{n} instance(s) on Ray")
    finally:
        if engine is not None:
            engine.draining = True
            await engine.close()
        try:
            await manager.shutdown.remote()
        finally:
            ray.kill(manager, no_restart=True)


async def _serve_local(ec: EngineConfig, gcfg: GrpcServeConfig) -> None:
    from accordion.cluster.local_engine import LocalEngineClient

    engine = await LocalEngineClient.create(ec)
    try:
        await _run_grpc(engine, gcfg, "1 in-process instance")
    finally:
        engine.draining = True
        await engine.close()


async def _run_grpc(engine, gcfg: GrpcServeConfig, what: str) -> None:
    server = build_server(engine, gcfg)
    await server.start()
    install_signal_handlers(server)
    print(f"accordion serving {engine.model_info().model_name} ({what}) on {server.address}", flush=True)
    await server.wait_for_termination()
    logger.info("gRPC server stopped; shutting the engine down")


def main(args: argparse.Namespace) -> int:
    """Run ``accordion serve`` until SIGTERM/SIGINT; 0 after a clean drain."""
    try:
        ec = engine_config_from_args(args)
        gcfg = grpc_config_from_args(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"accordion serve: {e}")
        return 2
    if args.no_ray:
        asyncio.run(_serve_local(ec, gcfg))
        return 0
    import ray

    _init_ray(args.ray_address, ClusterConfig(engine=ec).namespace)
    try:
        asyncio.run(_serve_ray(args, ec, gcfg))
    finally:
        ray.shutdown()
    return 0
