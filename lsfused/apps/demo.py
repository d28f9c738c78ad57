"""The main job: train the same network with torch Adam and with lsfused's line-search optimizers, side by side.

``lsfused demo`` (task ``digits``): scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes; they
ship inside the scikit-learn package, so nothing is downloaded), a small MLP, the same seed, split and batches for
every optimizer. Prints a table of final train loss, test accuracy, closure calls per step and wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import lsfused

OPTIMIZERS = ("adam", "adamsls", "plasls", "salsa", "sgdsls")
DEFAULT_OPTIMIZERS = ("adam", "adamsls", "plasls", "salsa")


@dataclass
class RunResult:
    name: str
    train_loss: float
    test_accuracy: float
    closure_calls_per_step: float
    wall_s: float
    steps: int
    losses: list[float]
    step_sizes: list[list[float]]


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


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizers at their defaults (Adam at its usual lr 1e-3; PLASLS over 3 layer components)."""
    params = list(model.parameters())
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if name == "adamsls":
        return lsfused.AdamSLS(params)
    if name == "sgdsls":
        return lsfused.SGDSLS(params)
    if name == "plasls":
        return lsfused.PLASLS(lsfused.components.by_layers(model, 3))
    if name == "salsa":
        return lsfused.SaLSa(params)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        return None
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)


def train(
    name: str,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
    model_fn: Callable[[int], nn.Module] = make_model,
) -> RunResult:
    """Train one optimizer; every optimizer sees the same initial weights and the same batches."""
    xtr, ytr, xte, yte = data
    model = model_fn(seed)
    n_batches = (len(xtr) + batch_size - 1) // batch_size
    opt = make_optimizer(name, model)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed + 1)
    bar = _progress(epochs * n_batches, name) if progress else None
    losses, step_sizes, calls, steps = [], [], 0, 0
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(n_batches):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = xtr[idx], ytr[idx]

            def closure(xb=xb, yb=yb) -> Tensor:
                return loss_fn(model(xb), yb)

            if isinstance(opt, lsfused.LineSearchOptimizer):
                loss = opt.step(closure)
                rec = opt.last_step
                calls += rec.closure_calls
                step_sizes.append(list(rec.step_sizes))
                postfix = {"loss": f"{float(loss):.4f}", "eta": f"{min(rec.step_sizes):.2e}", "trials": rec.trials}
            else:
                opt.zero_grad()
                loss = closure()
                loss.backward()
                opt.step()
                calls += 1
                step_sizes.append([group["lr"] for group in opt.param_groups])
                loss = loss.detach()
                postfix = {"loss": f"{float(loss):.4f}"}
            losses.append(float(loss))
            steps += 1
            if bar is not None:
                bar.set_postfix(postfix, refresh=False)
                bar.update()
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    with torch.no_grad():
        train_loss = float(loss_fn(model(xtr), ytr))
        accuracy = float((model(xte).argmax(1) == yte).float().mean())
    return RunResult(name, train_loss, accuracy, calls / max(steps, 1), wall, steps, losses, step_sizes)


def format_table(results: list) -> str:
    """The results table of both demos; the optimizer's share of the time when the results carry it."""
    share = all(hasattr(r, "optimizer_share") for r in results)
    header = f"{'optimizer':<10} {'train loss':>10} {'test acc':>9} {'calls/step':>10} {'wall s':>8}"
    header += f" {'optimizer share':>15}" if share else ""
    lines = [header, "-" * len(header)]
    for r in results:
        line = (
            f"{r.name:<10} {r.train_loss:>10.4f} {r.test_accuracy:>9.4f} {r.closure_calls_per_step:>10.2f} "
            f"{r.wall_s:>8.2f}"
        )
        lines.append(line + (f" {r.optimizer_share:>15.1%}" if share else ""))
    return "\n".join(lines)


def run_digits(
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS,
    epochs: int = 15,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[RunResult]:
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    data = load_digits(seed)
    return [train(name, data, epochs, batch_size, seed, progress) for name in optimizers]
