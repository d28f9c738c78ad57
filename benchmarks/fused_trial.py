"""Interleaved before/after of the fused first trial: every round times torch ``Adam(fused=True)`` and
each lsfused variant back to back on the same parameter list, so the machine's drift cancels in the per-round
ratios. "before" is today's optimizer with ``_fuse_first_trial = False`` (Pass A, then a Pass B for the first trial:
the op sequence before the fusion, bit-identical results). Accepted first trial, optimizer side only.

    PYTHONPATH=$PWD python benchmarks/fused_trial.py [--rounds 15] [--out benchmarks/results/fused_trial.csv]

``--lists bert-base --fused-only`` times only today's cpp steps on bert-base (a before/after of a kernel change is
pairs of such runs, one per build, alternated).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import write_csv  # benchmarks/, this script's folder

import lsfused
from lsfused.apps import bench

LISTS = {
    "bert-base": bench.BERT_BASE,
    "1M/20 tensors": bench.SMALL,
    "2000 x 10": [(10,)] * 2000,
}


def variants(shapes, device, fused_only: bool = False):
    """Step functions over three optimizers (b1 = 0, momentum, torch-fast); "before" switches the fusion off for
    its call only, so both sides of a comparison run on the same buffers. ``fused_only``: the cpp fused steps only."""

    def step(opt, fuse, rejections=0):
        inner = bench._lsfused_step(opt, bench._Script(rejections))

        def run():
            opt._fuse_first_trial = fuse
            try:
                inner()
            finally:
                opt._fuse_first_trial = True

        return run

    b0 = lsfused.AdamSLS(bench._make_params(shapes, device), betas=(0.0, 0.999), backend="cpp")
    momentum = lsfused.AdamSLS(bench._make_params(shapes, device), backend="cpp")
    steps = {
        "AdamSLS b1=0, before": (b0, False, 0),
        "AdamSLS b1=0, fused": (b0, True, 0),
        "AdamSLS b1=0, before, 3 backtracks": (b0, False, 3),
        "AdamSLS b1=0, fused, 3 backtracks": (b0, True, 3),
        "AdamSLS (momentum), before": (momentum, False, 0),
        "AdamSLS (momentum), fused": (momentum, True, 0),
    }
    out = {key: step(*spec) for key, spec in steps.items() if spec[1] or not fused_only}
    if not fused_only:
        fast = lsfused.AdamSLS(bench._make_params(shapes, device), betas=(0.0, 0.999), backend="torch-fast")
        out["AdamSLS b1=0, torch-fast"] = step(fast, True)
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/fused_trial.csv")
    parser.add_argument("--lists", nargs="+", choices=list(LISTS), default=list(LISTS))
    parser.add_argument("--fused-only", action="store_true", help="skip the unfused and torch-fast steps")
    args = parser.parse_args()
    device = torch.device("cpu")
    rows = []
    for name in args.lists:
        shapes = LISTS[name]
        params = bench._make_params(shapes, device)
        adam = torch.optim.Adam(params, lr=1e-3, fused=True)
        steps = variants(shapes, device, args.fused_only)
        ratios = {k: [] for k in steps}
        adam_ms = []
        for fn in [adam.step, *steps.values()]:  # warm-up
            fn()
        for _ in range(args.rounds):
            for key, fn in steps.items():
                a = timed(adam.step)
                ratios[key].append(timed(fn) / a)
                adam_ms.append(a * 1e3)
        for key, rs in ratios.items():
            q = statistics.quantiles(rs, n=5)
            row = dict(params=name, step=key, ratio=statistics.median(rs), p20=q[0], p80=q[3],
                       fused_adam_ms=statistics.median(adam_ms), machine=bench.machine())  # fmt: skip
            rows.append(row)
            print(f"{name:<14} {key:<36} {row['ratio']:6.2f}x fused Adam ({q[0]:.2f}-{q[3]:.2f})", flush=True)
    write_csv(args.out, rows)


if __name__ == "__main__":
    main()
