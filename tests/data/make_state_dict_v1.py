"""How ``state_dict_v1.pt`` was made: run once, from tests/, at commit 908589e (the last commit that wrote state_dict
format version 1, with its ``"lsfused"`` entry). tests/test_conformance.py loads the file with the current code."""

import torch
from conftest import batches, closure_for, mlp
from torch import nn

import lsfused


def deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


# name: (model, optimizer)
CONFIGS = {
    "adamsls": (
        lambda: mlp(dropout=0.2),
        lambda m: lsfused.AdamSLS(m.parameters(), betas=(0.9, 0.999), loss_scale="dynamic", max_grad_norm=5.0),
    ),
    "sgdsls": (lambda: mlp(dropout=0.2), lambda m: lsfused.SGDSLS(m.parameters())),
    "plasls": (
        deep_mlp,
        lambda m: lsfused.PLASLS(
            lsfused.components.by_layers(m, 3), schedule="random", merge_threshold=0.3, init_step_size=1.0
        ),
    ),
    "salsa": (lambda: mlp(dropout=0.2), lambda m: lsfused.SaLSa(m.parameters(), weight_decay=0.01)),
}

if __name__ == "__main__":
    out = {}
    for name, (make_model, make_opt) in CONFIGS.items():
        torch.manual_seed(123)
        model = make_model()
        opt = make_opt(model)
        data = batches(5)
        for i in range(6):
            x, y = data[i % 5]
            opt.step(closure_for(model, x, y))
        out[name] = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save(out, "data/state_dict_v1.pt")
