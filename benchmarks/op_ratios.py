"""Each fused op of an accepted ``AdamSLS(betas=(0, 0.999))`` step (cpp backend, bert-base's shapes) called on its
own, alternated with a torch ``Adam(fused=True)`` step on a parameter list of the same shapes: the op's time and its
ratio to the Adam step right before it (median and 20th-80th percentiles over the repeats). The ops' arguments are
those of a real step, recorded while it ran (a trial rejected first, so that the trial op runs too).

    PYTHONPATH=$PWD python benchmarks/op_ratios.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lsfused
from lsfused.apps import bench

OPS = ("grad_check", "direction_and_norms", "trial_step")


class Recorder:
    """The optimizer's backend, keeping the last arguments of each op in OPS."""

    def __init__(self, ops, calls: dict):
        self._ops, self._calls = ops, calls

    def __getattr__(self, name):
        fn = getattr(self._ops, name)
        if name not in OPS:
            return fn

        def recorded(*args, **kwargs):
            self._calls[name] = (fn, args, kwargs)
            return fn(*args, **kwargs)

        return recorded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device = torch.device("cpu")
    opt = lsfused.AdamSLS(bench._make_params(bench.BERT_BASE, device), betas=(0.0, 0.999), backend="cpp")
    adam = torch.optim.Adam(bench._make_params(bench.BERT_BASE, device), lr=1e-3, fused=True)
    calls: dict = {}
    opt._ops = Recorder(opt._ops, calls)
    step = bench._lsfused_step(opt, bench._Script(1))
    step()
    step()
    times: dict[str, list[float]] = {"fused Adam": [], **{name: [] for name in calls}}
    for _ in range(args.repeats):
        start = time.perf_counter()
        adam.step()
        times["fused Adam"].append(time.perf_counter() - start)
        for name, (fn, a, kw) in calls.items():
            start = time.perf_counter()
            fn(*a, **kw)
            times[name].append(time.perf_counter() - start)
    print(f"machine: {bench.machine()}; bert-base, AdamSLS(betas=(0, 0.999)), cpp")
    for name, ts in times.items():
        r = sorted(t / a for t, a in zip(ts, times["fused Adam"], strict=True))
        q = statistics.quantiles(r, n=5, method="inclusive")
        print(f"{name:<20} median {statistics.median(ts) * 1e3:6.1f} ms, {statistics.median(r):.3f}x fused Adam "
              f"({q[0]:.3f}-{q[3]:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
