"""Measure candidate defaults of AdamSLS and PLASLS on the two demo tasks, over seeds.

Digits (the MLP of ``lsfused demo --task digits``: 15 epochs, batch 64, PLASLS over 3 layer components): every config
below on every seed, one row per run appended to ``benchmarks/results/defaults.csv`` (runs already there are
skipped, so the script can be stopped and resumed)::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/defaults.py --task digits --seeds 0 1 2

Text (MiniLM-L6 on WordNet, 500 train / 400 test drawn per seed, batch 32, 80 steps, max length 48): the demo itself
runs the candidates, which the demo's registry holds as named rows (``adamsls`` = the defaults, ``adamsls-b0``,
``plasls``, ``plasls-paper``, ``plasls-joint``, ``plasls-authors``); every run goes to ``OUT/runs.jsonl``, and
``--resume`` lets several processes fill one record (one seed each)::

    lsfused demo --seed 0 --out OUT --resume --optimizers plasls,adamsls,adam,adam-tuned,salsa,plasls-paper,adamsls-b0
    lsfused demo --seed 1 --out OUT --resume --optimizers plasls,adamsls,plasls-paper,adamsls-b0

``--report [--text-runs OUT/runs.jsonl]`` writes the mean and spread per config of both tasks to
``benchmarks/results/defaults.md``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

import lsfused
from lsfused.apps import compare, demo
from lsfused.apps.registry import Context

HERE = Path(__file__).parent / "results"
CSV = HERE / "defaults.csv"
FIELDS = ("task", "config", "seed", "train_loss", "test_accuracy", "calls_per_step", "wall_s", "eta_min", "eta_max")
M0, M9 = (0.0, 0.999), (0.9, 0.999)

#: name -> (optimizer class, keyword arguments), in the order they run.
CONFIGS = {
    "adamsls b1=0": ("AdamSLS", dict(betas=M0)),
    "adamsls b1=0.9": ("AdamSLS", dict(betas=M9)),
    "plasls b1=0 fss=1 w0 (paper text, old default)": ("PLASLS", dict(betas=M0, full_search_steps=1)),
    "plasls b1=0.9 fss=6 w0": ("PLASLS", dict(betas=M9, full_search_steps=6)),
    "plasls b1=0.9 fss=1 w0": ("PLASLS", dict(betas=M9, full_search_steps=1)),
    "plasls b1=0 fss=6 w0": ("PLASLS", dict(betas=M0, full_search_steps=6)),
    "plasls b1=0.9 fss=6 w0 joint": ("PLASLS", dict(betas=M9, full_search_steps=6, joint_check=True)),
    "plasls b1=0.9 fss=6 sequential": ("PLASLS", dict(betas=M9, full_search_steps=6, trial_point="sequential")),
    "plasls b1=0.9 fss=1 w0 joint": ("PLASLS", dict(betas=M9, full_search_steps=1, joint_check=True)),
    "plasls b1=0 fss=6 w0 joint": ("PLASLS", dict(betas=M0, full_search_steps=6, joint_check=True)),
    "plasls b1=0.9 fss=6 sequential joint": (
        "PLASLS",
        dict(betas=M9, full_search_steps=6, trial_point="sequential", joint_check=True),
    ),
}


def factory(config: str):
    cls, kwargs = CONFIGS[config]

    def build(model, ctx: Context):
        if cls == "AdamSLS":
            return lsfused.AdamSLS(model.parameters(), **kwargs), None
        return lsfused.PLASLS(ctx.components(model), **kwargs), None

    return build


def done() -> set[tuple[str, str, int]]:
    if not CSV.exists():
        return set()
    with CSV.open() as f:
        return {(r["task"], r["config"], int(r["seed"])) for r in csv.DictReader(f)}


def measure(task: str, configs: list[str], seeds: list[int]) -> None:
    torch.set_num_threads(1)
    for config in configs:
        for seed in seeds:
            if (task, config, seed) in done():
                continue
            t0 = time.perf_counter()
            r = demo.train(config, factory(config), demo.load_digits(seed), 15, 64, seed, progress=False)
            last = r.step_sizes[-1]
            row = dict(task=task, config=config, seed=seed, train_loss=f"{r.train_loss:.6g}",
                       test_accuracy=f"{r.test_accuracy:.6g}", calls_per_step=f"{r.closure_calls_per_step:.4g}",
                       wall_s=f"{r.wall_s:.1f}", eta_min=f"{min(last):.3g}", eta_max=f"{max(last):.3g}")  # fmt: skip
            new = not CSV.exists()
            HERE.mkdir(parents=True, exist_ok=True)
            with CSV.open("a", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
            print(f"{task} {config} seed {seed}: {row} ({time.perf_counter() - t0:.0f} s)", flush=True)


def report(text_runs: Path | None) -> str:
    with CSV.open() as f:
        rows = list(csv.DictReader(f))
    lines = [
        "\n### digits (benchmarks/defaults.py)\n",
        "| config | seeds | train loss | test acc | calls/step | final eta min / max (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        runs = [r for r in rows if r["task"] == "digits" and r["config"] == config]
        if not runs:
            continue

        def ms(key: str, runs=runs) -> str:
            vals = [float(r[key]) for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.fmean(vals):.3f} ± {sd:.3f}"

        etas = (
            f"{statistics.fmean(float(r['eta_min']) for r in runs):.2g} / "
            f"{statistics.fmean(float(r['eta_max']) for r in runs):.2g}"
        )
        calls = statistics.fmean(float(r["calls_per_step"]) for r in runs)
        lines.append(f"| {config} | {len(runs)} | {ms('train_loss')} | {ms('test_accuracy')} | {calls:.2f} | {etas} |")
    if text_runs is not None and text_runs.exists():
        runs = sorted(compare.load_runs(text_runs).values(), key=lambda r: (r.name, r.seed))
        lines += [
            f"\n### text (lsfused demo runs, {text_runs.name})\n",
            "| optimizer | seeds | train loss | test acc | calls/step | final eta min / max (first seed) | per seed |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in compare.aggregate(runs):
            mine = [r for r in runs if r.name == row.name]
            last = mine[0].step_sizes[-1]
            per_seed = ", ".join(f"{r.seed}: {r.train_loss:.3f}/{r.test_accuracy:.3f}" for r in mine)
            lines.append(
                f"| {row.name} | {row.seeds} | {row.train_loss[0]:.3f} ± {row.train_loss[1]:.3f} | "
                f"{row.test_accuracy[0]:.3f} ± {row.test_accuracy[1]:.3f} | {row.calls_per_step[0]:.2f} | "
                f"{min(last):.2g} / {max(last):.2g} | {per_seed} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["digits"])
    parser.add_argument("--text-runs", type=Path, help="runs.jsonl of the text task's demo runs, for --report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", type=int, help="indices into CONFIGS (default: all)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    if args.task:
        names = list(CONFIGS)
        measure(args.task, [names[i] for i in args.configs] if args.configs else names, args.seeds)
    if args.report:
        table = report(args.text_runs)
        (HERE / "defaults.md").write_text(
            "Mean ± sample standard deviation over seeds (benchmarks/defaults.py).\n" + table
        )
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
