"""Host cost per engine step, with a model that costs nothing: the offline engine in this process against the
served engine (an engine process reached over its direct socket, as the front end reaches it), same workload.

Both run the real scheduler, input batch, sampler glue and output path; the model's forward returns zeros and its
logits always pick one token, so what is timed is the Python host work a GPU step waits on. The served side holds
``--concurrency`` requests open (a new one as one ends, like ``bench/serving_overhead.py``) through
:class:`~accordion.cluster.direct_client.DirectClient`; its per-step figures come from the engine process. Wall
time per step and the engine thread's CPU time per step are reported for both (their difference is time the
thread waited: the GIL, locks, the device). CPU only; runs in about a minute.

    python bench/engine_host_cost.py [--rounds 3] [--concurrency 64 --num-prompts 256 --input-len 512 --output-len 128]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accordion import LLM  # noqa: E402
from accordion.checkpoints import make_checkpoint  # noqa: E402
from accordion.cluster.request import Request, SamplingParams  # noqa: E402
from accordion.workers.model_runner import ModelRunner  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402


class _FreeModel(torch.nn.Module):
    """Hidden states of zeros; logits that always pick token 7."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.hidden, self.vocab = hidden, vocab

    def forward(self, input_ids, positions, kv_caches, backend, meta):
        return torch.zeros(len(input_ids), self.hidden)

    def compute_logits(self, hidden):
        logits = torch.zeros(len(hidden), self.vocab)
        logits[:, 7] = 1.0
        return logits


class FreeModelRunner(ModelRunner):
    """The real runner around :class:`_FreeModel` (the engine process builds this by name)."""

    def load_model(self) -> None:
        super().load_model()
        self.model = _FreeModel(self.arch.hidden_size, self.arch.vocab_size)


_BUSY = re.compile(r"busy period: (\d+) steps .*?, ([\d.]+) s in steps \([\d.]+ ms each, ([\d.]+) ms of it on the CPU")


def per_step(steps: int, wall_s: float, cpu_s: float) -> dict:
    return {"steps": steps, "ms_per_step": 1e3 * wall_s / steps, "cpu_ms_per_step": 1e3 * cpu_s / steps}


def offline_rounds(llm: LLM, rounds: list[list[list[int]]], params: SamplingParams) -> list[dict]:
    core, out = llm.instance.core, []
    for prompts in rounds:
        since = core.counters()
        t = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - t
        steps, _, step_s, _, cpu = (a - b for a, b in zip(core.counters(), since))
        out.append({"wall_s": wall, **per_step(steps, step_s, cpu)})
    return out


def served_rounds(llm: LLM, rounds: list[list[list[int]]], params: SamplingParams, concurrency: int) -> list[dict]:
    """The same rounds against an engine process over its direct socket. Per-step figures come from the busy-period
    lines the engine loop logs when it goes idle (its stderr, sent to a file here): the closed loop idles the engine
    between waves, so a round is several busy periods."""
    from accordion.cluster.direct_client import DirectClient
    from accordion.cluster.engine_process import EngineProcess

    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)  # the child inherits it
    try:
        proc = EngineProcess(llm.config, f"{__name__}:FreeModelRunner", "host-cost", on_step=lambda w, ld: None,
                             direct_host="127.0.0.1")
        info = proc.start(300)
    finally:
        os.dup2(saved, 2)
        os.close(saved)

    def busy_periods() -> list[tuple[int, float, float]]:
        log.seek(0)
        return [(int(m[1]), float(m[2]), int(m[1]) * float(m[3]) / 1e3) for m in _BUSY.finditer(log.read())]

    results = []

    async def run():
        done: dict[str, asyncio.Event] = {}

        def on_step(outputs, load):
            for o in outputs:
                if o.finished and o.request_id in done:
                    done.pop(o.request_id).set()

        client = await DirectClient.connect("host-cost", info["direct"]["address"], info["direct"]["token"],
                                            on_step, lambda reason: print("connection lost:", reason))
        slots = asyncio.Semaphore(concurrency)
        ids = iter(range(1 << 30))

        async def one(prompt):
            async with slots:
                rid = f"r{next(ids)}"
                ev = done[rid] = asyncio.Event()
                errors = await client.submit_groups([[Request(request_id=rid, prompt_token_ids=prompt,
                                                              sampling_params=params, eos_token_ids=(1,))]])
                if errors != [None]:
                    raise RuntimeError(f"submission refused: {errors}")
                await ev.wait()

        for prompts in rounds:
            before = len(busy_periods())
            t = time.perf_counter()
            await asyncio.gather(*(one(p) for p in prompts))
            wall = time.perf_counter() - t
            await asyncio.sleep(0.3)  # the engine goes idle and logs the round's last busy period
            periods = busy_periods()[before:]
            results.append({"wall_s": wall, **per_step(*(sum(x) for x in zip(*periods)))})
        await client.close()

    try:
        asyncio.run(run())
    finally:
        proc.stop()
        log.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    path = make_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "tiny-llama")
    llm = LLM(str(path), device="cpu", max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=args.concurrency, max_num_batched_tokens=8192)
    arch = llm.instance.worker.arch
    llm.instance.worker.model = _FreeModel(arch.hidden_size, arch.vocab_size)
    rng = random.Random(0)
    mk = (lambda n: [[rng.randrange(10, 500) for _ in range(args.input_len)] for _ in range(n)])
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    rounds = [mk(args.num_prompts) for _ in range(args.rounds)]
    llm.generate(mk(args.concurrency), params)  # warm-up
    offline = offline_rounds(llm, rounds, params)
    served = served_rounds(llm, [mk(args.concurrency)] + rounds, params, args.concurrency)[1:]  # after a warm-up

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    rows = [[name, f"{med(runs, 'ms_per_step'):.3f}", f"{med(runs, 'cpu_ms_per_step'):.3f}",
             f"{med(runs, 'steps'):.0f}", f"{med(runs, 'wall_s'):.3f}"]
            for name, runs in (("offline (this process; detokenizes too)", offline),
                               ("engine process over its socket", served))]
    print_table(rows, ["engine", "ms/step", "CPU ms/step", "steps", "wall s"])
    write_result("engine-host-cost", {"settings": vars(args), "offline": offline, "served": served})


if __name__ == "__main__":
    main()
