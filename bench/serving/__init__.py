"""Serving benchmark for accordion (``accordion bench serve``), following ``vllm bench serve`` (peers.md §3).

Modules:

* :mod:`records`: :class:`SampleRequest` (what to send) and :class:`RequestRecord` (what happened).
* :mod:`backend`: the adapter around ``accordion.client.AsyncClient`` plus an in-process fake.
* :mod:`arrivals`: the Gamma/Poisson arrival schedule with vLLM's rescaling.
* :mod:`workloads`: random, sharegpt-like, arxiv, mooncake and long-context-mix request generators.
* :mod:`metrics`: TTFT/TPOT/ITL/E2EL, throughput, goodput, concurrency (vLLM's definitions).
* :mod:`runner`: the async replay loop, rate sweeps and :func:`find_max_rate`.
* :mod:`report`: environment info, result JSON, latency-vs-rate plot, the human table.
"""
