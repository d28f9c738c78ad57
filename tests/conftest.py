import os

import torch

# Triton reads this when it is imported: without a GPU, run its kernels in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402


def mlp(seed: int = 0, dtype=torch.float32, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def batches(n: int = 4, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def closure_for(model: nn.Module, x, y):
    def closure():
        return nn.functional.cross_entropy(model(x), y)

    return closure


def snapshot(model: nn.Module, opt) -> dict:
    """Copies of every parameter and optimizer-state tensor, plus the step sizes, to compare with torch.equal."""
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    for i, (_, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            out[f"s{i}.{k}"] = v.detach().clone()
    out["step_sizes"] = [g["step_size"] for g in opt.param_groups]
    out["step_count"] = opt._step_count
    out["trial_skipping"] = opt._skipper.state()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture
def tiny():
    return mlp(), batches()
