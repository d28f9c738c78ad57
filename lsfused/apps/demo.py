"""The digits demo: train the same small network with torch Adam and with lsfused's line-search optimizers.

``lsfused demo --task digits``: scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes; they ship
inside the scikit-learn package, so nothing is downloaded), a small MLP, the same initial weights, split and batches
for every optimizer on a given seed. Prints mean and spread over seeds of final train loss, test accuracy, closure
calls per step and wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lsfused import components
from lsfused.apps import compare
from lsfused.apps.registry import Context, Factory

DEFAULT_OPTIMIZERS = ("adam", "adam-tuned", "adamsls", "plasls", "salsa")
SWEEP_LRS = (3e-4, 1e-3, 3e-3, 1e-2)


def context(steps: int) -> Context:
    """The digits task as the optimizer factories see it: PLASLS over 3 layer components, Adam at 1e-3, constant."""
    return Context(steps=steps, components=lambda model: components.by_layers(model, 3), adam_lr=1e-3)


def load_digits(seed: int, test_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as float32 tensors in [0, 1], split into train and test with a fixed seed."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("the digits demo needs scikit-learn: pip install 'lsfused[demo]'") from err
    data = _load()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        return None
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)


def train(
    name: str,
    factory: Factory,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
    model_fn: Callable[[int], nn.Module] = make_model,
    evaluations: int = 0,
) -> compare.RunResult:
    """Train one run; every optimizer sees the same initial weights and the same batches on a given seed.
    ``evaluations``: test-accuracy evaluations (one per ``epochs/evaluations`` epochs, plus one before training)."""
    xtr, ytr, xte, yte = data
    model = model_fn(seed)
    n_batches = (len(xtr) + batch_size - 1) // batch_size
    opt, scheduler = factory(model, context(epochs * n_batches))
    loss_fn = nn.CrossEntropyLoss()

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(xte).argmax(1) == yte).float().mean())

    with torch.no_grad():
        initial = float(loss_fn(model(xtr), ytr))
    checkpoints = {round(epochs * (i + 1) / evaluations) for i in range(evaluations)} if evaluations else set()
    curve = [(0.0, 0, accuracy())] if evaluations else []
    gen = torch.Generator().manual_seed(seed + 1)
    bar = _progress(epochs * n_batches, name) if progress else None
    losses, step_sizes, times, forwards, steps, wall = [], [], [], 0, 0, 0.0
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        start = time.perf_counter()
        for i in range(n_batches):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = xtr[idx], ytr[idx]

            def closure(xb=xb, yb=yb) -> Tensor:
                return loss_fn(model(xb), yb)

            loss, calls, sizes = compare.optimizer_step(opt, scheduler, closure)
            forwards += calls
            step_sizes.append(sizes)
            losses.append(loss)
            steps += 1
            times.append(wall + time.perf_counter() - start)
            if bar is not None:
                bar.set_postfix({"loss": f"{loss:.4f}", "eta": f"{min(sizes):.2e}", "calls": calls}, refresh=False)
                bar.update()
        wall += time.perf_counter() - start
        if epoch + 1 in checkpoints:
            curve.append((wall, forwards, accuracy()))
    if bar is not None:
        bar.close()
    with torch.no_grad():
        train_loss = float(loss_fn(model(xtr), ytr))
    return compare.RunResult(
        name, seed, initial, train_loss, accuracy(), steps, forwards, steps, wall, None, losses, step_sizes, curve,
        times=times,
    )  # fmt: skip


def run_digits(
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS,
    epochs: int = 15,
    batch_size: int = 64,
    seeds: tuple[int, ...] = (0,),
    progress: bool = True,
    sweep_lrs: tuple[float, ...] = SWEEP_LRS,
    evaluations: int | None = None,
    out: str | Path | None = None,
) -> tuple[list[compare.RunResult], str]:
    """Every optimizer on every seed (each seed draws its own split, initial weights and batch order); returns the
    results and the table (mean ± standard deviation over seeds). ``evaluations`` defaults to one per epoch.
    ``out``: also write ``table.txt`` and ``demo.png`` there."""
    evaluations = epochs if evaluations is None else evaluations
    datasets = {}

    def trainer(name: str, factory: Factory, seed: int) -> compare.RunResult:
        data = datasets.setdefault(seed, load_digits(seed))
        return train(name, factory, data, epochs, batch_size, seed, progress, evaluations=evaluations)

    results, _, notes = compare.run(trainer, optimizers, seeds, sweep_lrs)
    table = compare.format_table(compare.aggregate(results, notes))
    if out is not None:
        setting = (
            f"digits MLP, {epochs} epochs, batch {batch_size}, seeds {', '.join(map(str, seeds))}; "
            "mean ± standard deviation over seeds"
        )
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.txt").write_text(setting + "\n" + table + "\n")
        compare.plot(results, out / "demo.png", setting)
    return results, table
