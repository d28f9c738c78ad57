"""Precision diagnostics of line-search decisions: a recorder, its file format, a summary and a figure.

Attach a :class:`Recorder` to any lsfused optimizer; while attached, every step records per trial the step size,
the losses, the predicted decrease, the rounding bound of the loss difference, the decision margin
``(f(w0) - c*eta*s - f(trial)) / bound`` (in units of the noise floor: ``|margin| <= 1`` means rounding decided) and
the fraction of the update absorbed by rounding and the rule that produced the trial's step size (see
:data:`RULES`); per step and param group the float64 decision sums and how far a
float32 summation of the same terms would be from them, in float32 ulps. Off (not attached) it costs nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lsfused.reference import MODE_SGD, NORM_COLUMNS, direction, hp_row

_FP32_COLUMNS = ("s", "gg", "gd", "dd")
#: where a trial's step size came from: the first step's init_step_size, the init_step_size="auto" bound, the previous
#: step size grown (Eq. 2 / SaLSa's growth), the PLASLS joint check's tau = 1, eta*beta_b (or SaLSa's shrink), the
#: quadratic interpolation (aimed at the acceptance test's boundary on the model), or its safeguard (clamped to
#: [0.1, 0.9] times the last step, or less where beta_b/shrink is smaller, [0.1, 0.5] after a far miss; or the model
#: could not be used). See lsfused.optim.interpolation.
RULES = ("init", "auto", "grow", "joint", "geometric", "quadratic", "safeguard")


def _ulp32(x: float) -> float:
    t = torch.tensor(abs(x), dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(math.inf)) - t)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class Recorder:
    """Records every decision of an lsfused optimizer.

    Args:
        optimizer: an lsfused optimizer; the recorder attaches itself (one recorder per optimizer).
        path: optional JSON-lines file; each step is appended as one line when it ends.

    Attributes:
        rows: one dict per step (see :meth:`save` for the fields).
    """

    def __init__(self, optimizer, path: str | Path | None = None):
        if not hasattr(optimizer, "_recorder"):
            raise TypeError(f"{type(optimizer).__name__} is not an lsfused optimizer")
        self.optimizer = optimizer
        self.path = Path(path) if path is not None else None
        self.rows: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        optimizer._recorder = self

    def detach(self) -> None:
        """Stop recording."""
        if self.optimizer._recorder is self:
            self.optimizer._recorder = None

    # -- hooks called by the optimizer ----------------------------------------------------------------------------

    def begin_step(self, opt, f0: float, sums: torch.Tensor) -> None:
        fp32 = self._fp32_sums(opt)
        groups = []
        for gi in range(opt.n_groups):
            exact = dict(zip(NORM_COLUMNS, sums[gi].tolist(), strict=True))
            ulps = {}
            for col in _FP32_COLUMNS:
                x64, x32 = exact[col], fp32[gi][col]
                ulps[col] = abs(x32 - x64) / _ulp32(x64) if x64 != 0.0 else (0.0 if x32 == 0.0 else math.inf)
            groups.append({"sums": exact, "fp32_ulps": ulps})
        self._current = {
            "step": opt._step_count + 1,
            "loss": f0,
            "loss_dtype": str(opt._loss_dtype).replace("torch.", ""),
            "noise": opt._noise,
            "groups": groups,
            "trials": [],
        }

    def trial(
        self,
        opt,
        f0: float,
        ft: float,
        eta: float,
        predicted: float,
        accepted: bool,
        groups,
        direction,
        scale=None,
        rule: str | None = None,
    ) -> None:
        """One trial. ``scale`` (PLASLS joint check): per-group step sizes that ``eta`` multiplies; then ``eta`` is
        that factor and is recorded as ``tau``. ``rule``: which of :data:`RULES` produced ``eta``."""
        bound = opt.rounding_bound(f0, ft)
        margin = (f0 - predicted - ft) / bound if math.isfinite(ft) and bound > 0 else None
        self._current["trials"].append(
            {
                "eta": eta if scale is None else None,
                "tau": None if scale is None else eta,
                "loss": _finite(ft),
                "predicted": predicted,
                "bound": bound,
                "margin": margin,
                "accepted": accepted,
                "absorbed": opt.absorbed_fraction(groups, direction),
                "groups": list(groups),
                "rule": rule,
            }
        )

    def end_step(self, opt, record) -> None:
        row = self._current
        row.update(
            outcome=record.outcome,
            reason=record.reason,
            step_sizes=list(record.step_sizes),
            searched=list(record.searched),
            closure_calls=record.closure_calls,
            merged=list(record.merged) if record.merged else None,
            trial_skipped=record.trial_skipped,
            skip_rule=record.skip_rule,
            skipped_trial_passed=record.skipped_trial_passed,
            trial_loss=None if record.trial_loss is None else _finite(record.trial_loss),
            components=[list(c) for c in getattr(opt, "components", [list(range(opt.n_groups))])],
        )
        self.rows.append(row)
        self._current = None
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")

    # -- float32 reference sums -----------------------------------------------------------------------------------

    @staticmethod
    def _fp32_sums(opt) -> list[dict[str, float]]:
        """What a float32 implementation (the authors' code) would sum: float32 terms, float32 ``torch.sum``.

        The decrease term's element is taken as ``-g*d`` (= ``g*g/denom`` up to one rounding).
        """
        out = [dict.fromkeys(_FP32_COLUMNS, 0.0) for _ in range(opt.n_groups)]
        acc = [{c: torch.zeros((), dtype=torch.float32) for c in _FP32_COLUMNS} for _ in range(opt.n_groups)]
        for b in opt._buckets:
            for r, ((a, e), gi) in enumerate(zip(b.ranges, b.groups, strict=True)):
                v, m = (None if t is None else t[a:e] for t in (b.v, b.m))
                g = b.g[a:e].to(b.w0.dtype)
                d = direction(g, v, m, hp_row(b.hp, r), opt._mode, False).float()  # as the trials recompute it
                g = g.float()
                gd = (g * d).sum()
                acc[gi]["s"] += (g * g).sum() if opt._mode == MODE_SGD else -gd
                acc[gi]["gg"] += (g * g).sum()
                acc[gi]["gd"] += gd
                acc[gi]["dd"] += (d * d).sum()
        for gi, cols in enumerate(acc):
            out[gi] = {c: float(v) for c, v in cols.items()}
        return out

    # -- files ----------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write all rows as JSON lines: per step ``step, loss, loss_dtype, noise, outcome, reason, step_sizes,
        searched, closure_calls, merged, components, groups[{sums, fp32_ulps}], trials[{eta, loss, predicted,
        bound, margin, accepted, absorbed, groups, rule}]``. Non-finite numbers are stored as null."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for row in self.rows:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        return path

    @staticmethod
    def load(path: str | Path) -> list[dict[str, Any]]:
        """Read a file written by :meth:`save` (or by a recorder with ``path``)."""
        rows = []
        with Path(path).open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{n}: not a diagnostics record ({err.msg})") from None
        return rows


# -- analysis -------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]], collapse_below: float = 1e-12, collapse_orders: float = 6.0) -> dict:
    """Numbers a person asks first: collapses, decisions within the noise floor, worst fp32 disagreement."""
    if not rows:
        raise ValueError("no recorded steps")
    n_groups = len(rows[0]["step_sizes"])
    start = rows[0]["trials"][0]["eta"] if rows[0]["trials"] else rows[0]["step_sizes"][0]
    collapses = []
    for gi in range(n_groups):
        sizes = [r["step_sizes"][gi] for r in rows]
        smallest = min(sizes)
        if smallest < collapse_below or smallest < start * 10.0**-collapse_orders:
            first = next(r["step"] for r in rows if r["step_sizes"][gi] == smallest)
            collapses.append({"group": gi, "min_step_size": smallest, "at_step": first, "start": start})
    trials = [t for r in rows for t in r["trials"]]
    within = [t for t in trials if t["margin"] is not None and abs(t["margin"]) <= 1.0]
    worst = max(
        (
            (u, col, r["step"], gi)
            for r in rows
            for gi, g in enumerate(r["groups"])
            for col, u in g["fp32_ulps"].items()
        ),
        default=(0.0, None, None, None),
    )
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    rules: dict[str, dict[str, int]] = {}  # rule -> {"trials": n, "accepted": n}
    for t in trials:
        entry = rules.setdefault(str(t.get("rule")), {"trials": 0, "accepted": 0})
        entry["trials"] += 1
        entry["accepted"] += bool(t["accepted"])
    return {
        "steps": len(rows),
        "trials": len(trials),
        "outcomes": outcomes,
        "rules": rules,
        # rows recorded before these fields existed lack them: None / rule "None"
        "closure_calls_per_step": (
            sum(r["closure_calls"] for r in rows) / len(rows) if all("closure_calls" in r for r in rows) else None
        ),
        "collapses": collapses,
        "trials_within_noise_floor": len(within),
        "accepted_within_noise_floor": sum(t["accepted"] for t in within),
        "fully_absorbed_trials": sum(t["absorbed"] >= 0.999 for t in trials),
        "max_fp32_ulps": {"ulps": worst[0], "column": worst[1], "step": worst[2], "group": worst[3]},
        "merges": [{"step": r["step"], "components": r["merged"]} for r in rows if r["merged"]],
        "final_step_sizes": rows[-1]["step_sizes"],
        # skip_trials: trials skipped, and of those measured (skip_trials="measure") the ones that would have failed
        "skipped_trials": sum(bool(r.get("trial_skipped")) for r in rows),
        "skipped_trials_measured": sum(r.get("skipped_trial_passed") is not None for r in rows),
        "skipped_trials_failing": sum(r.get("skipped_trial_passed") is False for r in rows),
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"steps: {summary['steps']}, trials: {summary['trials']}, outcomes: {summary['outcomes']}",
        f"closure calls per step: {summary['closure_calls_per_step'] or float('nan'):.2f}",
        "trials by the rule that chose their step size (accepted/tried): "
        + ", ".join(f"{rule} {e['accepted']}/{e['trials']}" for rule, e in summary["rules"].items()),
        f"trials decided within the noise floor (|margin| <= 1): {summary['trials_within_noise_floor']} "
        f"({summary['accepted_within_noise_floor']} of them accepted)",
        f"trials whose update was fully absorbed by rounding: {summary['fully_absorbed_trials']}",
    ]
    if summary.get("skipped_trials"):
        measured = summary["skipped_trials_measured"]
        line = f"skipped trials (skip_trials): {summary['skipped_trials']} of {summary['steps']} steps"
        if measured:
            line += f"; measured {measured}, of which {summary['skipped_trials_failing']} would have failed"
        lines.append(line)
    worst = summary["max_fp32_ulps"]
    lines.append(
        f"largest fp32-vs-fp64 disagreement: {worst['ulps']:.3g} ulps ({worst['column']}, step {worst['step']}, "
        f"group {worst['group']})"
    )
    if summary["collapses"]:
        for c in summary["collapses"]:
            lines.append(
                f"COLLAPSE: group {c['group']} step size fell to {c['min_step_size']:.3g} at step {c['at_step']} "
                f"(start {c['start']:.3g})"
            )
    else:
        lines.append("no step-size collapse")
    for m in summary["merges"]:
        lines.append(f"merge at step {m['step']}: components {m['components']}")
    lines.append("final step sizes: " + ", ".join(f"{e:.3g}" for e in summary["final_step_sizes"]))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """A PNG: step sizes per param group (log), decision margins, absorbed fraction, fp32 disagreement; merges
    marked with vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    ax = axes[0]
    for gi in range(len(rows[0]["step_sizes"])):
        ax.plot(steps, [max(r["step_sizes"][gi], 1e-320) for r in rows], label=f"group {gi}")
    skipped = [r for r in rows if r.get("trial_skipped")]
    if skipped:  # skip_trials: where a trial was skipped (red: measured, it would have failed)
        failing = [r.get("skipped_trial_passed") is False for r in skipped]
        ax.scatter(
            [r["step"] for r in skipped],
            [max(min(r["step_sizes"]), 1e-320) for r in skipped],
            c=["tab:red" if f else "0.4" for f in failing],
            marker="|",
            s=40,
            label="trial skipped",
            zorder=3,
        )
    ax.set_yscale("log")
    ax.set_ylabel("step size")
    ax.legend(fontsize=7, ncol=4)
    ax = axes[1]
    xs, ys, colors = [], [], []
    for r in rows:
        for t in r["trials"]:
            if t["margin"] is not None:
                xs.append(r["step"])
                ys.append(t["margin"])
                colors.append("tab:green" if t["accepted"] else "tab:red")
    ax.scatter(xs, ys, c=colors, s=6)
    ax.axhspan(-1, 1, color="0.85", label="noise floor (|margin| <= 1)", zorder=0)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("margin / bound")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.scatter([r["step"] for r in rows for _ in r["trials"]], [t["absorbed"] for r in rows for t in r["trials"]], s=6)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("absorbed fraction")
    ax = axes[3]
    for col in _FP32_COLUMNS:
        ax.plot(steps, [max(max(g["fp32_ulps"][col] for g in r["groups"]), 1e-3) for r in rows], label=col)
    ax.set_yscale("log")
    ax.set_ylabel("fp32 vs fp64 (ulps)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7, ncol=4)
    for r in rows:
        if r["merged"]:
            for a in axes:
                a.axvline(r["step"], color="tab:purple", lw=0.8, ls="--")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(rows: list[dict[str, Any]], out: str | Path, title: str = "") -> str:
    """Write ``summary.txt`` and ``diagnostics.png`` into ``out``; return the summary text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_summary(summarize(rows))
    (out / "summary.txt").write_text(text + "\n")
    plot(rows, out / "diagnostics.png", title)
    return text
