"""Shared fixtures: markers, tiny random checkpoints, the embedded SmolLM2 model, and the block invariant."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be set before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if has_cuda else 0
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_multi = pytest.mark.skip(reason="needs several CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n_gpus < 2:
            item.add_marker(skip_multi)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(preset) -> path of a random-weight checkpoint, made once per session."""
    from accordion.checkpoints import make_checkpoint

    made: dict[str, str] = {}

    def get(preset: str) -> str:
        if preset not in made:
            made[preset] = str(make_checkpoint(tmp_path_factory.mktemp(preset), preset))
        return made[preset]

    return get


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded default model, prepared (downloaded + converted) once per cache directory."""
    from accordion.default_model import prepare_default

    return str(prepare_default())


def assert_idle_blocks_free(llm) -> None:
    """At idle every KV block is free or cached, and the pool's bookkeeping is consistent."""
    sched = llm.scheduler
    assert not sched.has_unfinished()
    sched.check_invariants()
    assert sched.kv.num_free_blocks == sched.kv.num_blocks, "KV blocks leaked"


@pytest.fixture
def nan_empty():
    """torch.empty that is NaN-filled, so unwritten outputs cannot pass a comparison."""

    def make(*shape, **kw):
        return torch.full(shape, float("nan"), **kw)

    return make


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
