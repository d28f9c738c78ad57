"""``lsfused bench --memory``: optimizer memory measured from outside, each optimizer in its own process.

A child process first builds and steps the optimizer over one small tensor: what a process pays once, whatever
the model's size (``fixed_mb``: the first torch optimizer built in a process imports ``torch._dynamo``, about 140 MB
on CPU, for torch's Adam as for lsfused's). It then makes ``n_tensors`` parameters of ``numel`` elements in all,
with gradients (the model's own memory, before the optimizer), and reads its resident memory after building the
optimizer and after each of ``steps`` steps. Bytes per parameter = (resident memory grown since before the
optimizer) / ``numel``. glibc's mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_=131072``) so that freed buffers
leave the process; without it the figures move by up to 14 B/param from run to run, by what the allocator keeps.

The step of a line search evaluates ``f = 0.5 * sum(w*w)`` (its backward writes ``g = w``); torch's Adam steps on
the gradients as they are. The peak during the steps is the largest of the readings after each step, not a sampled
peak: a temporary that lives only inside a step is not in it (``lsfused gpu-check``'s
``torch.cuda.max_memory_allocated`` is, on a GPU).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import lsfused

#: what each row builds, over a list of parameters
OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "adamsls": lambda ps: lsfused.AdamSLS(ps),
    "adamsls-b0": lambda ps: lsfused.AdamSLS(ps, betas=(0.0, 0.999)),
    "salsa": lambda ps: lsfused.SaLSa(ps),
    "sgdsls": lambda ps: lsfused.SGDSLS(ps),
}
MMAP_THRESHOLD = "131072"


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_here(name: str, numel: int, n_tensors: int, dtype: torch.dtype, steps: int) -> dict[str, float]:
    """In this process: bytes per parameter after building ``name`` and after ``steps`` steps (see the module)."""
    start = _resident()
    _steps(OPTIMIZERS[name], [torch.nn.Parameter(torch.randn(64).to(dtype))], 1)  # what a process pays once
    fixed = _resident() - start
    torch.manual_seed(0)
    params = make_params(numel, n_tensors, dtype)
    before = _resident()
    readings = _steps(OPTIMIZERS[name], params, steps)
    return {
        "fixed_mb": fixed / 2**20,
        "built": (readings[0] - before) / numel,
        "steps": (readings[-1] - before) / numel,
        "peak_reading": (max(readings) - before) / numel,
    }


def make_params(
    numel: int, n_tensors: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> list[torch.nn.Parameter]:
    """``numel`` parameters in ``n_tensors`` tensors, with gradients: a model's own memory, before an optimizer."""
    sizes = [numel // n_tensors + (i < numel % n_tensors) for i in range(n_tensors)]
    params = [torch.nn.Parameter(torch.randn(n, device=device).to(dtype)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _steps(make: Callable, params: list[torch.nn.Parameter], steps: int) -> list[int]:
    """Build an optimizer over ``params`` and step it: the resident memory after building and after each step."""
    opt = make(params)
    readings = [_resident()]
    step_all(opt, params, steps, lambda: readings.append(_resident()))
    return readings


def step_all(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, after: Callable[[], object] = lambda: None
) -> None:
    """``steps`` steps: a line search on ``f = 0.5 * sum(w*w)``, torch's optimizers on the gradients as they are."""
    for _ in range(steps):
        if isinstance(opt, lsfused.LineSearchOptimizer):
            opt.step(lambda: sum(0.5 * (p.float() * p.float()).sum() for p in params))
        else:
            opt.step()
        after()


def measure(
    name: str, numel: int = 32 * 2**20, n_tensors: int = 8, dtype: str = "float32", steps: int = 3
) -> dict[str, float]:
    """``measure_here`` in a fresh process with the mmap threshold fixed."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    cmd = [sys.executable, "-m", "lsfused.apps.memory", name, str(numel), str(n_tensors), dtype, str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"measuring {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(
    names: tuple[str, ...] = tuple(OPTIMIZERS), numel: int = 32 * 2**20, dtype: str = "float32", repeats: int = 1
) -> list[dict]:
    """One row per optimizer (and repeat): bytes per parameter, and the difference to fused Adam's in this run."""
    rows = []
    for r in range(repeats):
        for name in names:
            rows.append(
                {"name": name, "dtype": dtype, "numel": numel, "repeat": r, **measure(name, numel, dtype=dtype)}
            )
    for row in rows:  # against fused Adam of the same repeat and dtype, measured in this run
        adam = [r["steps"] for r in rows if r["name"] == "adam-fused" and r["repeat"] == row["repeat"]]
        row["minus_adam"] = row["steps"] - adam[0] if adam else float("nan")
    return rows


def append_csv(rows: list[dict], path: Path, machine: str) -> Path:
    """Append ``rows`` to the CSV at ``path`` (with a header when new), each with the machine and versions."""
    fields = ["name", "dtype", "numel", "repeat", "fixed_mb", "built", "steps", "peak_reading", "minus_adam"]
    fields += ["machine", "torch", "lsfused", "date"]
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    today = _dt.date.today().isoformat()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            extra = {"machine": machine, "torch": torch.__version__, "lsfused": lsfused.__version__, "date": today}
            writer.writerow({k: row[k] for k in fields if k in row} | extra)
    return path


def summary(rows: list[dict]) -> list[dict]:
    """Per optimizer and dtype: the mean and the spread (max - min) over repeats of bytes per parameter."""
    out: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        out.setdefault((row["name"], row["dtype"]), []).append(row)
    table = []
    for (name, dtype), group in out.items():
        steps = [r["steps"] for r in group]
        minus = [r["minus_adam"] for r in group]
        table.append({
            "name": name, "dtype": dtype, "built": sum(r["built"] for r in group) / len(group),
            "steps": sum(steps) / len(steps), "spread": max(steps) - min(steps), "minus_adam": sum(minus) / len(minus),
            "fixed_mb": sum(r["fixed_mb"] for r in group) / len(group),
        })  # fmt: skip
    return table


def format_rows(rows: list[dict]) -> str:
    """The summary as a Markdown table."""
    head = "| optimizer | dtype | B/param built | B/param after steps (spread) | minus fused Adam | once per process |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in summary(rows):
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['built']:.2f} | {r['steps']:.2f} ({r['spread']:.2f}) | "
            f"{r['minus_adam']:+.2f} | {r['fixed_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(OPTIMIZERS))
    p.add_argument("numel", type=int)
    p.add_argument("n_tensors", type=int)
    p.add_argument("dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("steps", type=int)
    a = p.parse_args(argv)
    print(json.dumps(measure_here(a.name, a.numel, a.n_tensors, getattr(torch, a.dtype), a.steps)))


if __name__ == "__main__":
    main()
