"""accordion.kernels: Triton GPU kernels (attention in accordion.kernels.attention)."""
