"""Geometric vs interpolating backtracking on the two demo tasks, several seeds.

Runs the digits task (``lsfused.apps.demo``: MLP, 15 epochs, batch 64) and the text task
(``lsfused.apps.finetune``: MiniLM-L6 on WordNet, 80 steps, batch 32) through the demos' own training loops, with
the optimizer factories below (``lsfused.apps.registry`` for Adam). Per run it keeps every step's closure calls and
trials, the batch losses, the final train loss and test accuracy and the wall time; ``--table`` turns the JSON into
the tables committed in ``docs/backtracking.md``.

Usage::

    PYTHONPATH=$PWD python benchmarks/backtracking.py --task digits --seeds 0 1 2 --out docs/backtracking/digits.json
    PYTHONPATH=$PWD python benchmarks/backtracking.py --task text --seeds 0 1 2 --out docs/backtracking/text_all.json
    PYTHONPATH=$PWD python benchmarks/backtracking.py --table docs/backtracking/text_all.json

Definitions: "calls/step" is closure calls over steps (Adam: 1); "wall x Adam" is the run's mean wall time per step
over Adam's in the same seed (same batches, run right before or after it on the same machine); "steps to Adam's
loss" is the first step at which the 8-batch moving average of the batch loss reaches Adam's final train loss (the
full training set, evaluated after its last step), and "time to Adam's loss" that step count times the run's mean
step time, over Adam's total training time (below 1: the line search gets there sooner).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import lsfused

# name -> (class, keyword arguments); every other setting is the class's default
CONFIGS = {
    "adamsls": ("AdamSLS", {}),
    "adamsls-interp": ("AdamSLS", {"backtracking": "interpolate"}),
    "adamsls-interp-auto": ("AdamSLS", {"backtracking": "interpolate", "init_step_size": "auto"}),
    "adamsls-auto": ("AdamSLS", {"init_step_size": "auto"}),
    "salsa": ("SaLSa", {}),
    "salsa-interp": ("SaLSa", {"backtracking": "interpolate"}),
}
DEFAULT = ("adam", "adamsls", "adamsls-interp", "adamsls-interp-auto", "salsa", "salsa-interp")
FIRST = 10  # steps shown in the first-steps table


def _factory(name: str, records: list):
    """A demo factory (``lsfused.apps.registry``) for ``name``: Adam from the registry, the CONFIGS optimizers with
    every step's StepRecord logged."""
    from lsfused.apps import registry

    if name not in CONFIGS:
        return registry.OPTIMIZERS[name]
    cls, kwargs = CONFIGS[name]

    def make(model, ctx):
        opt = getattr(lsfused, cls)(model.parameters(), **kwargs)
        step = opt.step

        def logged(*args, **kw):
            out = step(*args, **kw)
            records.append(opt.last_step)
            return out

        opt.step = logged
        return opt, None

    return make


def _run(task: str, name: str, seed: int, steps: int | None) -> dict:
    records: list = []
    factory = _factory(name, records)
    start = time.perf_counter()
    if task == "digits":
        from lsfused.apps import demo

        r = demo.train(name, factory, demo.load_digits(seed), 15, 64, seed, progress=False)
    else:
        from lsfused.apps import finetune, textdata

        data = textdata.load_wordnet(500, 400, seed)
        r = finetune.finetune(name, factory, data, 5, 32, 48, seed, steps, progress=False)
    total = time.perf_counter() - start
    n = len(r.losses)
    return {
        "task": task,
        "name": name,
        "seed": seed,
        "steps": n,
        "train_loss": r.train_loss,
        "test_accuracy": r.test_accuracy,
        "calls_per_step": r.forwards / max(r.steps, 1),
        "wall_s": r.wall_s,
        "total_s": total,
        "losses": r.losses,
        "step_sizes": [s[0] for s in r.step_sizes],
        "trials": [rec.trials for rec in records],
        "calls": [rec.closure_calls for rec in records],
        "outcomes": [rec.outcome for rec in records],
    }


def _moving(xs: list[float], window: int = 8) -> list[float]:
    return [statistics.fmean(xs[max(0, i - window + 1) : i + 1]) for i in range(len(xs))]


def _ms(xs: list[float], fmt: str) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.fmean(xs), fmt)} ± {format(statistics.stdev(xs), fmt)}"


def table(runs: list[dict]) -> str:
    """Markdown tables: mean ± standard deviation over seeds, and the first steps' trials."""
    adam = {r["seed"]: r for r in runs if r["name"] == "adam"}
    names = list(dict.fromkeys(r["name"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"seeds {seeds}; mean ± standard deviation over seeds",
        "",
        "| optimizer | calls/step | wall x Adam | train loss | test acc | steps to Adam's loss | time to Adam's loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rows = [r for r in runs if r["name"] == name]
        ratio, reach_steps, reach_time = [], [], []
        for r in rows:
            a = adam.get(r["seed"])
            if a is None:
                continue
            per_step = r["wall_s"] / r["steps"]
            ratio.append(per_step / (a["wall_s"] / a["steps"]))
            hit = next((i + 1 for i, x in enumerate(_moving(r["losses"])) if x <= a["train_loss"]), None)
            reach_steps.append(hit)
            reach_time.append(None if hit is None else hit * per_step / a["wall_s"])
        missed = sum(h is None for h in reach_steps)
        lines.append(
            f"| {name} | {_ms([r['calls_per_step'] for r in rows], '.2f')} | {_ms(ratio, '.2f')} | "
            f"{_ms([r['train_loss'] for r in rows], '.4f')} | {_ms([r['test_accuracy'] for r in rows], '.4f')} | "
            f"{_ms(reach_steps, '.1f')}{f' ({missed} never)' if missed else ''} | {_ms(reach_time, '.2f')} |"
        )
    lines += [
        "",
        f"trials in the first {FIRST} steps (per seed)",
        "",
        "| optimizer | seed | trials | sum |",
        "|---|---|---|---|",
    ]
    for name in names:
        for r in (r for r in runs if r["name"] == name and r["trials"]):
            first = r["trials"][:FIRST]
            lines.append(f"| {name} | {r['seed']} | {' '.join(map(str, first))} | {sum(first)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["digits", "text"], default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--optimizers", nargs="+", default=list(DEFAULT))
    p.add_argument("--steps", type=int, default=80, help="text: steps per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="JSON file; runs already in it are kept and skipped")
    p.add_argument("--table", help="print the tables of this JSON file and exit")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out) if args.out else None
    runs = json.loads(out.read_text()) if out and out.exists() else []
    done = {(r["name"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for name in args.optimizers:
            if (name, seed) in done:
                continue
            r = _run(args.task, name, seed, args.steps)
            runs.append(r)
            print(
                f"{args.task} seed {seed} {name}: calls/step {r['calls_per_step']:.2f} loss {r['train_loss']:.4f} "
                f"acc {r['test_accuracy']:.4f} wall {r['wall_s']:.1f}s first trials {r['trials'][:FIRST]}",
                flush=True,
            )
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(runs))
    print(table(runs))


if __name__ == "__main__":
    main()
