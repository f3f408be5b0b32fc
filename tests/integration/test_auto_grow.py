"""The instance pool grows when the Ray cluster gains a GPU node (what the autoscaler or KubeRay does).

Runs in a subprocess: a two-node ``ray.cluster_utils.Cluster`` of logical GPUs, engines on the CPU.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import sys, time
    import ray
    from ray.cluster_utils import Cluster
    from accordion.cluster.config import CacheConfig, ClusterConfig, DeviceConfig, EngineConfig, ModelConfig
    from accordion.cluster.global_manager import start_manager

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    ray.init(address=cluster.address, namespace="grow", log_to_driver=False)
    ec = EngineConfig(model=ModelConfig(model=sys.argv[1], max_model_len=128), cache=CacheConfig(num_blocks=32),
                      device=DeviceConfig(device="cpu"))
    cc = ClusterConfig(engine=ec, namespace="grow", gpus_per_instance=1.0, cpus_per_instance=0.5,
                       auto_grow=True, health_check_interval_s=0.5)
    manager = start_manager(cc)
    ray.get(manager.start.remote(1), timeout=120)
    cluster.add_node(num_cpus=2, num_gpus=1)  # the "autoscaler" adds a GPU node
    deadline = time.time() + 120
    while time.time() < deadline:
        live = [r for r in ray.get(manager.list_instances.remote()) if r.routable]
        if len(live) == 2:
            print("GREW", len(live)); break
        time.sleep(0.5)
    ray.get(manager.shutdown.remote(), timeout=60)
    ray.shutdown(); cluster.shutdown()
''')


@pytest.mark.slow
def test_pool_grows_with_new_gpu_node(tiny_ckpt):
    res = subprocess.run([sys.executable, "-c", SCRIPT, tiny_ckpt("tiny-llama")], capture_output=True, text=True,
                         timeout=400)
    assert "GREW 2" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
