"""Where an optimizer step's time goes: each fused op the step calls, timed around the optimizer's own calls, next to
torch ``Adam(fused=True)`` on the same parameter list (bert-base's shapes, ``cpp`` backend, optimizer side only: the
closure returns a scripted loss, as in ``fused_trial.py``).

With ``--alone``, each op the step called is then called again on its own with the step's last arguments,
alternated with a fused Adam step: its time and its ratio to the Adam step right before it (median and 20th-80th
percentiles; ``--rejections 1`` so that the trial op runs too).

    PYTHONPATH=$PWD python benchmarks/step_ops.py [--rejections 3] [--steps 12] [--alone]
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
    """The optimizer's backend with every op call timed and its last arguments kept."""

    def __init__(self, ops, times: dict[str, list[float]], calls: dict):
        self._ops, self._times, self._calls = ops, times, calls

    def __getattr__(self, name):
        fn = getattr(self._ops, name)
        if not callable(fn):
            return fn

        def timed(*args, **kwargs):
            self._calls[name] = (fn, args, kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._times[name].append(time.perf_counter() - start)
            return out

        return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rejections", type=int, default=0, help="trials rejected before one is accepted")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--alone", action="store_true", help="also time each op on its own against fused Adam")
    args = parser.parse_args()
    device = torch.device("cpu")
    opt = lsfused.AdamSLS(bench._make_params(bench.BERT_BASE, device), betas=(0.0, 0.999), backend="cpp")
    adam = torch.optim.Adam(bench._make_params(bench.BERT_BASE, device), lr=1e-3, fused=True)
    times: dict[str, list[float]] = collections.defaultdict(list)
    calls: dict = {}
    opt._ops = Timed(opt._ops, times, calls)
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
    if args.alone:
        alone(adam, calls, args.steps)


def alone(adam, calls: dict, repeats: int) -> None:
    times: dict[str, list[float]] = {"fused Adam": [], **{name: [] for name in calls}}
    for _ in range(repeats):
        start = time.perf_counter()
        adam.step()
        times["fused Adam"].append(time.perf_counter() - start)
        for name, (fn, args, kwargs) in calls.items():
            start = time.perf_counter()
            fn(*args, **kwargs)
            times[name].append(time.perf_counter() - start)
    print("each op alone, alternated with fused Adam:")
    for name, ts in times.items():
        r = [t / a for t, a in zip(ts, times["fused Adam"], strict=True)]
        q = statistics.quantiles(r, n=5, method="inclusive")
        print(f"  {name:<20} median {statistics.median(ts) * 1e3:6.1f} ms, {statistics.median(r):.3f}x fused Adam "
              f"({q[0]:.3f}-{q[3]:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
