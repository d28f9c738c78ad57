"""The own-backward path ``step(closure, loss=loss)`` against ``step(closure)`` with dropout.

    PYTHONPATH=. python benchmarks/own_backward.py [loop ...]

Loops: ``closure`` (``step(closure)``), ``loss`` (zero_grad, forward, backward, ``step(closure, loss=loss)``, as a new
user writes it), ``watch`` (the same after ``opt.watch(model)``), ``noise`` (``loss`` with a random op between
``zero_grad()`` and the forward, so the capture cannot match), ``accelerate`` (``Accelerator.prepare`` and
``accelerator.backward``), ``acc_watch`` (the same after ``opt.watch(model)``). Models: an MLP 20-64-5 with dropout
0.5 and a 2-layer BERT with its shipped dropout 0.1, 30 steps each on one fixed batch (where a mismatched mask shows
most: the loss falls low enough that the gradient of another mask stops being a descent direction). Prints the final
step size, the outcome counts, the closure calls per step, whether the parameters equal ``step(closure)``'s and how
many lsfused warnings were raised.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter

import torch
from torch import nn

import lsfused

STEPS = 30


def mlp_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 5))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(1)]

    def loss_fn(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    return model, data, loss_fn


def bert_task():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 100, (16, 12), generator=g), torch.randint(0, 2, (16,), generator=g)) for _ in range(1)]

    def loss_fn(model, batch):
        ids, labels = batch
        return model(input_ids=ids, labels=labels).loss

    return model, data, loss_fn


def run(task, loop: str, steps: int = STEPS) -> dict:
    model, data, loss_fn = task()
    model.train()
    opt = lsfused.AdamSLS(model.parameters())
    stepper = opt
    backward = torch.Tensor.backward
    if loop in ("watch", "acc_watch"):
        opt.watch(model)
    if loop in ("accelerate", "acc_watch"):
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model, stepper = accelerator.prepare(model, opt)
        backward = accelerator.backward
    outcomes: Counter = Counter()
    calls = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            batch = data[i % len(data)]

            def closure(batch=batch):
                return loss_fn(model, batch)

            if loop == "closure":
                opt.step(closure)
            else:
                stepper.zero_grad()
                if loop == "noise":
                    torch.rand(1)  # e.g. a random augmentation or a sampler between zero_grad() and the forward
                loss = closure()
                backward(loss)
                opt.step(closure, loss=loss)
            outcomes[opt.last_step.outcome] += 1
            calls += opt.last_step.closure_calls
    return {
        "step_size": opt.param_groups[0]["step_size"],
        "outcomes": dict(outcomes),
        "calls_per_step": calls / steps,
        "warnings": [w for w in caught if "loss=loss" in str(w.message)],
        "params": [p.detach().clone() for p in model.parameters()],
    }


def main(loops: list[str]) -> None:
    for name, task in (("mlp", mlp_task), ("bert", bert_task)):
        ref = None
        for loop in loops:
            if loop.startswith("acc") and name == "mlp":
                continue
            try:
                r = run(task, loop)
            except Exception as err:  # noqa: BLE001 - a loop this version of lsfused does not offer
                print(f"{name:5s} {loop:10s} n/a ({type(err).__name__}: {err})")
                continue
            same = ""
            if loop == "closure":
                ref = r["params"]
            elif ref is not None:
                same = "bit-identical" if all(torch.equal(a, b) for a, b in zip(ref, r["params"], strict=True)) else ""
            print(
                f"{name:5s} {loop:10s} eta={r['step_size']:.3g} {r['outcomes']} calls/step={r['calls_per_step']:.2f} "
                f"{same} {len(r['warnings'])} warning(s)"
            )


if __name__ == "__main__":
    main(sys.argv[1:] or ["closure", "loss", "watch", "noise", "accelerate", "acc_watch"])
