"""One engine instance: a scheduler over the KV pool of one device and the worker that executes its plans.

The worker class is named by import path and resolved here, lazily, so the control plane never imports the data
plane (``accordion.workers``) at module level.
"""

from __future__ import annotations

import importlib
import logging

from accordion.cluster.config import EngineConfig
from accordion.cluster.engine import EngineCore
from accordion.cluster.scheduler import Scheduler

logger = logging.getLogger(__name__)

DEFAULT_WORKER = "accordion.workers.model_runner:ModelRunner"


def load_class(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class EngineInstance:
    """Builds the worker (load weights, size and allocate the KV cache), then the scheduler over that pool."""

    def __init__(self, config: EngineConfig, worker_cls: str = DEFAULT_WORKER):
        self.config = config
        self.worker = load_class(worker_cls)(config)
        self.worker.load_model()
        self.num_blocks = self.worker.profile_num_blocks()
        self.worker.init_kv_cache(self.num_blocks)
        self.max_model_len = config.model.resolved_max_model_len()
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks=self.num_blocks,
                                   max_model_len=self.max_model_len)
        self.core = EngineCore(self.scheduler, self.worker)
        logger.info("engine instance ready: %d KV blocks, max_model_len %d", self.num_blocks, self.max_model_len)
