"""accordion: distributed long-context LLM serving.

Offline use::

    from accordion import LLM, SamplingParams
    llm = LLM("smollm2")
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
"""

from accordion.cluster.outputs import CompletionOutput, RequestOutput
from accordion.cluster.request import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; keep `import accordion` light for the client SDK and the CLI.
    if name == "LLM":
        from accordion.llm import LLM

        return LLM
    raise AttributeError(name)
