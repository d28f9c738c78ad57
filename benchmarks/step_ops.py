"""Where an optimizer step's time goes: each fused op the step calls, timed around the optimizer's own calls, next to
torch ``Adam(fused=True)`` on the same parameter list (bert-base's shapes, ``cpp`` backend, optimizer side only: the
closure returns a scripted loss, as in ``fused_trial.py``).

    PYTHONPATH=$PWD python benchmarks/step_ops.py [--rejections 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

import lsfused
from lsfused.apps import bench


class Timed:
    """The optimizer's backend with every op call timed."""

    def __init__(self, ops, times: dict[str, list[float]]):
        self._ops, self._times = ops, times

    def __getattr__(self, name):
        fn = getattr(self._ops, name)
        if not callable(fn):
            return fn

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._times[name].append(time.perf_counter() - start)
            return out

        return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rejections", type=int, default=0, help="trials rejected before one is accepted")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cpu")
    opt = lsfused.AdamSLS(bench._make_params(bench.BERT_BASE, device), betas=(0.0, 0.999), backend="cpp")
    adam = torch.optim.Adam(bench._make_params(bench.BERT_BASE, device), lr=1e-3, fused=True)
    times: dict[str, list[float]] = collections.defaultdict(list)
    opt._ops = Timed(opt._ops, times)
    step = bench._lsfused_step(opt, bench._Script(args.rejections))
    step_ms, adam_ms = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        adam.step()
        adam_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        step()
        step_ms.append((time.perf_counter() - start) * 1e3)
    print(f"machine: {bench.machine()}; bert-base, AdamSLS(betas=(0, 0.999)), {args.rejections} rejected trials")
    print(f"fused Adam {statistics.median(adam_ms):.1f} ms, the step {statistics.median(step_ms):.1f} ms (medians)")
    for name, ts in times.items():
        print(f"  {name}: {len(ts) // args.steps} call(s) per step, median {statistics.median(ts) * 1e3:.1f} ms")
    reads = []  # the gradient read once by torch: what a pass that only reads g costs here
    for _ in range(args.steps):
        start = time.perf_counter()
        for b in opt._buckets:
            b.g.sum()
        reads.append((time.perf_counter() - start) * 1e3)
    print(f"  torch.sum over the gradient: median {statistics.median(reads):.1f} ms")


if __name__ == "__main__":
    main()
