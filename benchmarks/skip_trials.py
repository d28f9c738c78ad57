"""How often ``skip_trials`` skips a trial that would have failed: the rule's error rate.

    PYTHONPATH=. python benchmarks/skip_trials.py [--task text|digits] [--seeds 3] [--rows a,b,...]

Runs the demo's ``*-skip-measure`` rows (``skip_trials="measure"``: the decisions and the trajectory of
``skip_trials=True``, bit for bit, plus one forward per skipped trial to evaluate it) with a recorder attached and
prints, per row and seed, the skipped trials, how many of them would have failed the acceptance test, how many would
have raised the loss on their batch, and the final training loss and test accuracy (equal to the ``*-skip`` rows of
the demo table run on the same machine and seeds: a check that the measurement changed nothing). Appends the rows to
``benchmarks/results/skip_trials.csv``. Timing is not measured here (the demo table does that).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from lsfused.apps import demo, finetune, registry
from lsfused.diagnostics import Recorder, summarize

ROWS = (
    "adamsls-skip-measure",
    "adamsls-interpolate-skip-measure",
    "salsa-skip-measure",
    "salsa-interpolate-skip-measure",
)
OUT = Path(__file__).parent / "results" / "skip_trials.csv"


def measured(name: str, task: str, seed: int) -> dict:
    rows: list[dict] = []

    def factory(model, ctx):
        opt, scheduler = registry.OPTIMIZERS[name](model, ctx)
        recorder = Recorder(opt)
        recorder.rows = rows  # the run's steps, collected here
        return opt, scheduler

    if task == "text":
        from lsfused.apps import textdata

        data = textdata.load_wordnet(500, 400, seed)
        result = finetune.finetune(name, factory, data, 5, 32, 48, seed, progress=False)
    else:
        result = demo.train(name, factory, demo.load_digits(seed), 15, 64, seed, progress=False)
    summary = summarize(rows)
    # a skipped trial whose loss, measured, is above the loss at its starting point (NaN counts as risen)
    increased = sum(
        1 for r in rows if r["trial_skipped"] and not (r["trial_loss"] is not None and r["trial_loss"] <= r["loss"])
    )
    return {
        "task": task,
        "row": name,
        "seed": seed,
        "steps": summary["steps"],
        "skipped": summary["skipped_trials"],
        "would_fail": summary["skipped_trials_failing"],
        "loss_rose": increased,
        "calls_per_step": (sum(r["closure_calls"] for r in rows) - summary["skipped_trials_measured"]) / len(rows),
        "train_loss": result.train_loss,
        "test_accuracy": result.test_accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["text", "digits"], default="text")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args()
    results = [measured(name, args.task, seed) for name in args.rows.split(",") for seed in range(args.seeds)]
    new = not OUT.exists()
    with OUT.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        if new:
            writer.writeheader()
        writer.writerows(results)
    print(f"{'row':34} {'skipped':>8} {'would fail':>11} {'error rate':>11} {'calls/step':>11}")
    for name in args.rows.split(","):
        mine = [r for r in results if r["row"] == name]
        skipped, failing = sum(r["skipped"] for r in mine), sum(r["would_fail"] for r in mine)
        rates = [r["would_fail"] / r["skipped"] for r in mine if r["skipped"]]
        spread = f" ± {statistics.stdev(rates):.2f}" if len(rates) > 1 else ""
        calls = statistics.mean(r["calls_per_step"] for r in mine)
        print(f"{name:34} {skipped:8d} {failing:11d} {failing / max(skipped, 1):7.2f}{spread:>6} {calls:11.2f}")


if __name__ == "__main__":
    main()
