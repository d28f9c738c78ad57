"""Measure candidate defaults of AdamSLS and PLASLS on the two demo tasks, over seeds (issue 15).

Text: MiniLM-L6 on WordNet (500 train / 400 test drawn by seed, batch 32, 5 epochs = 80 steps, max length 48,
dropout 0 so that every run is deterministic). Digits: the MLP of ``lsfused demo --task digits`` (15 epochs, batch
64). Each (task, config, seed) run appends one row to ``benchmarks/results/defaults.csv``; runs already there are
skipped, so the script can be stopped, resumed and run in several processes on disjoint ``--configs``.
``--report`` writes the mean and spread per config to ``benchmarks/results/defaults.md``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/defaults.py --task text --seeds 0 1 2
    python benchmarks/defaults.py --report
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
from lsfused.apps import demo, finetune, textdata
from lsfused.apps.registry import Context

HERE = Path(__file__).parent / "results"
CSV = HERE / "defaults.csv"
FIELDS = ("task", "config", "seed", "train_loss", "test_accuracy", "calls_per_step", "wall_s", "eta_min", "eta_max")
M0, M9 = (0.0, 0.999), (0.9, 0.999)

#: name -> (optimizer class, keyword arguments, leave the pooler out); in the order they run.
CONFIGS = {
    "adamsls b1=0": ("AdamSLS", dict(betas=M0), False),
    "adamsls b1=0.9": ("AdamSLS", dict(betas=M9), False),
    "plasls b1=0 fss=1 w0 (paper text, old default)": ("PLASLS", dict(betas=M0, full_search_steps=1), False),
    "plasls b1=0.9 fss=6 w0": ("PLASLS", dict(betas=M9, full_search_steps=6), False),
    "plasls b1=0.9 fss=6 w0 joint": ("PLASLS", dict(betas=M9, full_search_steps=6, joint_check=True), False),
    "plasls b1=0.9 fss=6 sequential": ("PLASLS", dict(betas=M9, full_search_steps=6, trial_point="sequential"), False),
    "plasls b1=0.9 fss=1 w0 joint": ("PLASLS", dict(betas=M9, full_search_steps=1, joint_check=True), False),
    "plasls b1=0 fss=6 w0 joint": ("PLASLS", dict(betas=M0, full_search_steps=6, joint_check=True), False),
    "plasls b1=0.9 fss=6 sequential joint": (
        "PLASLS",
        dict(betas=M9, full_search_steps=6, trial_point="sequential", joint_check=True),
        False,
    ),
    "plasls b1=0.9 fss=6 w0 joint, pooler out": (
        "PLASLS",
        dict(betas=M9, full_search_steps=6, joint_check=True),
        True,
    ),
}


def factory(config: str):
    cls, kwargs, no_pooler = CONFIGS[config]

    def build(model, ctx: Context):
        if cls == "AdamSLS":
            return lsfused.AdamSLS(model.parameters(), **kwargs), None
        comps = lsfused.components.bert_components(model, include_pooler=False) if no_pooler else ctx.components(model)
        return lsfused.PLASLS(comps, **kwargs), None

    return build


def done() -> set[tuple[str, str, int]]:
    if not CSV.exists():
        return set()
    with CSV.open() as f:
        return {(r["task"], r["config"], int(r["seed"])) for r in csv.DictReader(f)}


def measure(task: str, configs: list[str], seeds: list[int]) -> None:
    torch.set_num_threads(1)
    for config in configs:
        if task == "digits" and CONFIGS[config][2]:
            continue  # no pooler in the MLP
        for seed in seeds:
            if (task, config, seed) in done():
                continue
            t0 = time.perf_counter()
            if task == "text":
                data = textdata.load_wordnet(500, 400, seed)
                r = finetune.finetune(config, factory(config), data, 5, 32, 48, seed, progress=False, dropout=0.0)
            else:
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


def report() -> str:
    with CSV.open() as f:
        rows = list(csv.DictReader(f))
    lines = []
    for task in ("text", "digits"):
        lines += [
            f"\n### {task}\n",
            "| config | seeds | train loss | test acc | calls/step | wall s | final eta min / max (mean) |",
            "|---|---|---|---|---|---|---|",
        ]
        for config in CONFIGS:
            runs = [r for r in rows if r["task"] == task and r["config"] == config]
            if not runs:
                continue

            def ms(key: str, fmt: str, runs=runs) -> str:
                vals = [float(r[key]) for r in runs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                return f"{statistics.fmean(vals):{fmt}} ± {sd:{fmt}}"

            etas = (
                f"{statistics.fmean(float(r['eta_min']) for r in runs):.2g} / "
                f"{statistics.fmean(float(r['eta_max']) for r in runs):.2g}"
            )
            calls = statistics.fmean(float(r["calls_per_step"]) for r in runs)
            wall = statistics.fmean(float(r["wall_s"]) for r in runs)
            lines.append(
                f"| {config} | {len(runs)} | {ms('train_loss', '.3f')} | {ms('test_accuracy', '.3f')} | {calls:.2f} "
                f"| {wall:.0f} | {etas} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["text", "digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", type=int, help="indices into CONFIGS (default: all)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    if args.task:
        names = list(CONFIGS)
        measure(args.task, [names[i] for i in args.configs] if args.configs else names, args.seeds)
    if args.report:
        table = report()
        (HERE / "defaults.md").write_text(
            "Mean ± sample standard deviation over seeds (benchmarks/defaults.py).\n" + table
        )
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
