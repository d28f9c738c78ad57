"""Comparing optimizers over seeds: run records, mean and spread per optimizer, the tuned-Adam sweep, the table and
the figure shared by both demos."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lsfused
from lsfused.apps.registry import OPTIMIZERS, TUNED_ADAM, Context, Factory, adam


@dataclass
class RunResult:
    """One training run of one optimizer on one seed.

    ``forwards`` counts closure calls (forward passes: the gradient's and every trial's), ``backwards`` backward
    passes; ``wall_s`` is the training time without the evaluations; ``curve`` holds ``(wall_s, forwards, test
    accuracy)`` at every evaluation (the first before training); ``times`` the training wall time at the end of
    every step.
    """

    name: str
    seed: int
    initial_train_loss: float
    train_loss: float
    test_accuracy: float
    steps: int
    forwards: int
    backwards: int
    wall_s: float
    optimizer_share: float | None = None
    losses: list[float] = field(default_factory=list)
    step_sizes: list[list[float]] = field(default_factory=list)
    curve: list[tuple[float, int, float]] = field(default_factory=list)
    lr: float | None = None
    times: list[float] = field(default_factory=list)

    @property
    def closure_calls_per_step(self) -> float:
        return self.forwards / max(1, self.steps)


def optimizer_step(opt: torch.optim.Optimizer, scheduler, closure) -> tuple[float, int, list[float]]:
    """One step of either kind of optimizer: (loss at the start, forward passes, step sizes or learning rates)."""
    if isinstance(opt, lsfused.LineSearchOptimizer):
        loss = opt.step(closure)
        rec = opt.last_step
        return float(loss), rec.closure_calls, list(rec.step_sizes)
    opt.zero_grad()
    loss = closure()
    loss.backward()
    opt.step()
    sizes = [group["lr"] for group in opt.param_groups]
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach()), 1, sizes


@dataclass
class Row:
    """Mean and sample standard deviation (0 for one seed) over the seeds of one optimizer.

    With a reference row (``"adam"``) in the comparison: ``wall_ratio`` is the mean training wall time over the
    reference's (the runs have the same number of steps, so it is the per-step ratio), and ``to_reference`` the mean
    wall time to reach the reference's final training loss and on how many seeds it was reached (see
    :func:`time_to_loss`)."""

    name: str
    seeds: int
    train_loss: tuple[float, float]
    test_accuracy: tuple[float, float]
    calls_per_step: tuple[float, float]
    wall_s: tuple[float, float]
    optimizer_share: tuple[float, float] | None
    note: str = ""
    wall_ratio: float | None = None
    to_reference: tuple[float, int] | None = None


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


SMOOTHING = 8
"""Batch losses are averaged over this many steps before comparing them (the figure's moving average too)."""


def smoothed(losses: Sequence[float], window: int = SMOOTHING) -> list[float]:
    """Trailing moving average of the per-step batch losses."""
    return [statistics.fmean(losses[max(0, k - window + 1) : k + 1]) for k in range(len(losses))]


def time_to_loss(run: RunResult, target: float) -> float | None:
    """Training wall time at the first step whose smoothed batch loss is at or below ``target`` (None: never)."""
    for k, loss in enumerate(smoothed(run.losses)):
        if loss <= target:
            return run.times[k]
    return None


def aggregate(results: Sequence[RunResult], notes: dict[str, str] | None = None, reference: str = "adam") -> list[Row]:
    """One row per optimizer name (in first-seen order): mean and spread over its runs.

    When ``reference`` is among the names, every row also gets its wall time relative to the reference's and the
    time to reach the reference's final training loss (the mean over its seeds of the last smoothed batch loss; the
    same measure on both sides, since the full training-set loss is only known at the end)."""
    by_name: dict[str, list[RunResult]] = {}
    for r in results:
        by_name.setdefault(r.name, []).append(r)
    ref = by_name.get(reference)
    target = statistics.fmean(smoothed(r.losses)[-1] for r in ref) if ref and all(r.losses for r in ref) else None
    rows = []
    for name, runs in by_name.items():
        share = None
        if all(r.optimizer_share is not None for r in runs):
            share = _mean_sd([r.optimizer_share for r in runs])
        ratio = to_ref = None
        if ref:
            ratio = statistics.fmean(r.wall_s for r in runs) / max(statistics.fmean(r.wall_s for r in ref), 1e-12)
        if target is not None and all(len(r.times) == len(r.losses) > 0 for r in runs):
            reached = [t for t in (time_to_loss(r, target) for r in runs) if t is not None]
            to_ref = (statistics.fmean(reached) if reached else math.nan, len(reached))
        rows.append(
            Row(
                name,
                len(runs),
                _mean_sd([r.train_loss for r in runs]),
                _mean_sd([r.test_accuracy for r in runs]),
                _mean_sd([r.closure_calls_per_step for r in runs]),
                _mean_sd([r.wall_s for r in runs]),
                share,
                (notes or {}).get(name, ""),
                ratio,
                to_ref,
            )
        )
    return rows


def select_lr(sweep: dict[float, Sequence[RunResult]]) -> float:
    """The learning rate whose runs end at the lowest mean training loss (non-finite losses lose; ties: smaller lr)."""
    if not sweep:
        raise ValueError("the learning-rate sweep is empty")

    def key(lr: float) -> tuple[float, float]:
        loss = statistics.fmean(r.train_loss for r in sweep[lr])
        return (loss if math.isfinite(loss) else math.inf, lr)

    return min(sweep, key=key)


def format_table(rows: Sequence[Row], reference: str = "adam") -> str:
    """Mean ± sample standard deviation over seeds; the optimizer's share of the time when every row has it; wall
    time relative to the reference and time to its final loss when the rows have them."""
    share = all(r.optimizer_share is not None for r in rows)
    ratio = all(r.wall_ratio is not None for r in rows)
    to_ref = all(r.to_reference is not None for r in rows)
    width = max([len(r.name) for r in rows] + [9])
    header = f"{'optimizer':<{width}} {'seeds':>5} {'train loss':>17} {'test acc':>17} {'calls/step':>10}"
    header += f" {'wall s':>13}"
    header += f" {'x ' + reference:>7}" if ratio else ""
    header += f" {'s to ' + reference + ' loss':>17}" if to_ref else ""
    header += f" {'opt. share':>10}" if share else ""
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (
            f"{r.name:<{width}} {r.seeds:>5} {r.train_loss[0]:>8.4f} ± {r.train_loss[1]:<6.4f} "
            f"{r.test_accuracy[0]:>8.4f} ± {r.test_accuracy[1]:<6.4f} {r.calls_per_step[0]:>10.2f} "
            f"{r.wall_s[0]:>6.3g} ± {r.wall_s[1]:<4.2g}"
        )
        line += f" {r.wall_ratio:>6.2f}x" if ratio else ""
        if to_ref:
            t, n = r.to_reference
            line += f" {(f'{t:.3g}' if n else '-') + f' ({n}/{r.seeds})':>17}"
        line += f" {r.optimizer_share[0]:>10.1%}" if share else ""
        lines.append(line + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


Trainer = Callable[[str, Factory, int], RunResult]
"""``trainer(name, factory, seed)`` trains one run; the factory receives the task's :class:`Context`."""


def load_runs(path: Path) -> dict[tuple[str, int], RunResult]:
    """Runs recorded by :func:`run` (one JSON object per line), by (name, seed)."""
    runs = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = RunResult(**json.loads(line))
            r.curve = [tuple(c) for c in r.curve]
            runs[(r.name, r.seed)] = r
    return runs


def run(
    trainer: Trainer,
    optimizers: Sequence[str],
    seeds: Sequence[int],
    sweep_lrs: Sequence[float],
    record: Path | None = None,
) -> tuple[list[RunResult], dict[float, list[RunResult]], dict[str, str]]:
    """Every optimizer on every seed; ``"adam-tuned"``: ``adam`` at each of ``sweep_lrs`` on the first seed, the
    lowest final training loss wins (:func:`select_lr`) and runs on the other seeds. Returns the results, the sweep
    and a note per row (the tuned lr and the sweep's cost in forward and backward passes).

    ``record``: a JSON-lines file every finished run is appended to; runs already in it (same name and seed) are
    read back instead of trained again, so a long comparison can be stopped and resumed."""
    for name in optimizers:
        if name not in OPTIMIZERS and name != TUNED_ADAM:
            raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join((*OPTIMIZERS, TUNED_ADAM))}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    optimizers = list(dict.fromkeys(optimizers))  # a name given twice is one row
    if TUNED_ADAM in optimizers and not sweep_lrs:
        raise ValueError("adam-tuned needs learning rates to sweep")

    def train(name: str, factory: Factory, seed: int) -> RunResult:
        # Read before every run: another process may be filling the same record.
        done = load_runs(record) if record is not None and Path(record).exists() else {}
        if (name, seed) in done:
            return done[(name, seed)]
        result = trainer(name, factory, seed)
        if record is not None:
            with Path(record).open("a") as f:
                f.write(json.dumps(result.__dict__) + "\n")
        return result

    sweep: dict[float, list[RunResult]] = {}
    notes: dict[str, str] = {}
    runs: dict[str, list[RunResult]] = {name: [] for name in optimizers}
    best = None
    # Seeds outermost: each seed's runs follow each other, so a machine whose speed drifts over an hour-long
    # comparison shifts all rows of a seed alike instead of one row's wall times.
    for seed in seeds:
        for name in optimizers:
            if name != TUNED_ADAM:
                runs[name].append(train(name, OPTIMIZERS[name], seed))
            elif best is not None:
                runs[name].append(train(name, _adam_at(best), seed))
            else:  # the first seed: the sweep, whose best run is this seed's tuned run
                for lr in sweep_lrs:
                    sweep[lr] = [train(f"adam lr {lr:g}", _adam_at(lr), seed)]
                best = select_lr(sweep)
                runs[name].append(RunResult(**{**sweep[best][0].__dict__, "name": name, "lr": best}))
                cost_f = sum(r.forwards for rs in sweep.values() for r in rs)
                cost_b = sum(r.backwards for rs in sweep.values() for r in rs)
                notes[name] = (
                    f"lr {best:g}, best of {', '.join(f'{lr:g}' for lr in sweep_lrs)} on seed {seed}'s training "
                    f"loss; sweep cost {cost_f} forward + {cost_b} backward passes"
                )
    results = [r for name in optimizers for r in runs[name]]
    return results, sweep, notes


def _adam_at(lr: float) -> Factory:
    def factory(model, ctx: Context):
        return adam(model, ctx, lr)

    return factory


def plot(results: Sequence[RunResult], path: Path, title: str) -> Path:
    """Four panels: training loss (mean over seeds), step sizes (first seed; PLASLS per component, dotted), test
    accuracy against training wall time and against forward passes (mean over seeds at each evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax_loss, ax_eta), (ax_time, ax_fwd) = axes
    by_name: dict[str, list[RunResult]] = {}
    for r in results:
        by_name.setdefault(r.name, []).append(r)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len({r.name for r in results}) > len(cycle):  # more rows than the default colours: no two lines alike
        cycle = [plt.get_cmap("tab20")(i) for i in range(20)]
    for i, (name, runs) in enumerate(by_name.items()):
        color = cycle[i % len(cycle)]
        n = min(len(r.losses) for r in runs)
        mean = [statistics.fmean(r.losses[k] for r in runs) for k in range(n)]
        ax_loss.plot(smoothed(mean), color=color, label=f"{name} ({len(runs)} seeds)")
        first = runs[0]
        n_comp = len(first.step_sizes[0]) if first.step_sizes else 0
        for c in range(n_comp):
            ax_eta.plot([s[c] for s in first.step_sizes], color=color, lw=1.5 if c == 0 else 0.8,
                        ls="-" if c == 0 else ":", label=(name if n_comp == 1 else f"{name} ({n_comp} components)")
                        if c == 0 else None)  # fmt: skip
        points = min(len(r.curve) for r in runs)
        if points:
            wall = [statistics.fmean(r.curve[k][0] for r in runs) for k in range(points)]
            fwd = [statistics.fmean(r.curve[k][1] for r in runs) for k in range(points)]
            acc = [statistics.fmean(r.curve[k][2] for r in runs) for k in range(points)]
            ax_time.plot(wall, acc, marker="o", ms=3, color=color, label=name)
            ax_fwd.plot(fwd, acc, marker="o", ms=3, color=color, label=name)
    ax_loss.set(xlabel="step", ylabel=f"training loss (batch, mean over seeds, moving average of {SMOOTHING})")
    ax_eta.set(xlabel="step", ylabel="step size / learning rate (first seed)", yscale="log")
    ax_time.set(xlabel="training wall time, s (evaluations excluded)", ylabel="test accuracy (mean over seeds)")
    ax_fwd.set(xlabel="forward passes (closure calls)", ylabel="test accuracy (mean over seeds)")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 160), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
