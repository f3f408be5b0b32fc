"""Kernel tests: without CUDA, Triton runs in its numpy interpreter (must be set before triton is imported).

GPU-only tests carry @pytest.mark.gpu; the root conftest skips them without CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
