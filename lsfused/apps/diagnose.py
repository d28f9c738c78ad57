"""``lsfused diagnose``: a short training with a :class:`lsfused.diagnostics.Recorder` attached.

The digits demo's data and model by default (fixed batch order), or a user's script; the recorded rows go to
``lsfused.diagnostics.report``.
"""

from __future__ import annotations

import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lsfused
from lsfused.apps import demo
from lsfused.diagnostics import Recorder


def _script_setup(path: str) -> tuple[nn.Module, list, Any]:
    """A user's script defines ``setup() -> (model, batches, loss_fn)``; batches is a list of ``(x, y)``."""
    namespace = runpy.run_path(path)
    if "setup" not in namespace:
        raise ValueError(f"{path} must define setup() returning (model, batches, loss_fn)")
    return namespace["setup"]()


def _digits_setup(model_name: str, seed: int) -> tuple[nn.Module, list, Any]:
    xtr, ytr, _, _ = demo.load_digits(seed)
    if model_name == "linear":
        torch.manual_seed(seed)
        model = nn.Linear(64, 10)
    else:
        model = demo.make_model(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(len(xtr), generator=gen)
    batches = [(xtr[perm[i : i + 64]], ytr[perm[i : i + 64]]) for i in range(0, len(xtr), 64)]
    return model, batches, nn.CrossEntropyLoss()


def make_optimizer(
    name: str, model: nn.Module, armijo: str, backtracking: str = "geometric", skip_trials: bool | str = False
) -> lsfused.LineSearchOptimizer:
    params = list(model.parameters())
    options = dict(armijo=armijo, backtracking=backtracking, skip_trials=skip_trials)
    if name == "plasls":
        # one component per parameter tensor: the finest split, where collapses show first
        return lsfused.PLASLS([[p] for p in params], **options)
    classes = {"adamsls": lsfused.AdamSLS, "sgdsls": lsfused.SGDSLS, "salsa": lsfused.SaLSa}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}; choose from plasls, adamsls, sgdsls, salsa")
    return classes[name](params, **options)


@dataclass
class DiagnoseRun:
    """What :func:`run` trained and recorded."""

    rows: list[dict[str, Any]]
    model: Any
    optimizer: Any
    batches: list
    loss_fn: Any


def run(
    optimizer: str = "plasls",
    armijo: str = "noise_aware",
    epochs: int = 5,
    model: str = "mlp",
    script: str | None = None,
    seed: int = 0,
    record_path: str | Path | None = None,
    progress: bool = True,
    stop_at_first: str | None = None,
    backtracking: str = "geometric",
    skip_trials: bool | str = False,
) -> DiagnoseRun:
    """Train with a recorder attached (the digits demo's data by default, fixed batch order).

    ``stop_at_first``: stop right after the first step with this outcome (e.g. ``"failed"``), to inspect it.
    """
    net, batches, loss_fn = _script_setup(script) if script else _digits_setup(model, seed)
    opt = make_optimizer(optimizer, net, armijo, backtracking, skip_trials)
    recorder = Recorder(opt, record_path)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=epochs * len(batches), desc=f"{optimizer} ({armijo})", dynamic_ncols=True)
        except ImportError:  # pragma: no cover - tqdm is in the demo extra
            bar = None
    stop = False
    for _ in range(epochs):
        for x, y in batches:
            opt.step(lambda x=x, y=y: loss_fn(net(x), y))
            rec = opt.last_step
            if bar is not None:
                bar.set_postfix(loss=f"{rec.loss:.3e}", eta=f"{min(rec.step_sizes):.1e}", refresh=False)
                bar.update()
            if stop_at_first is not None and rec.outcome == stop_at_first:
                stop = True
                break
        if stop:
            break
    if bar is not None:
        bar.close()
    recorder.detach()
    return DiagnoseRun(recorder.rows, net, opt, batches, loss_fn)
