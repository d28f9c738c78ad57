"""Reproduce the step-size collapse of docs/numerics.md: `python docs/collapse_experiment.py` (about 3 minutes).

Multinomial logistic regression on scikit-learn's digits (convex, real data), AdamSLS at the paper's defaults,
batch 64 in a fixed order, 300 epochs, once with ``armijo="classic"`` and once with ``"noise_aware"``. Writes the
recorded decisions and figures under docs/numerics/ and prints the tables quoted in docs/numerics.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lsfused import diagnostics, reference
from lsfused.apps import demo, diagnose

OUT = Path(__file__).parent / "numerics"
EPOCHS = 300


def evaluate(model) -> tuple[float, float]:
    xtr, ytr, xte, yte = demo.load_digits(0)
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(xtr), ytr))
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return loss, acc


def anatomy_of_the_first_failure() -> dict:
    """Stop the classic run at its first failed step (w is back at w0; g, v and the hyperparameters still give d) and
    evaluate the loss along ``w0 + eta*d`` in float32 (as the optimizer saw it) and in float64 (the same weights,
    exact-ish)."""
    result = diagnose.run("adamsls", "classic", EPOCHS, "linear", progress=False, stop_at_first="failed")
    step = result.rows[-1]["step"]
    x, y = result.batches[(step - 1) % len(result.batches)]
    (bucket,) = result.optimizer._buckets
    w0 = bucket.w0.clone()
    d = reference.direction(bucket.g, bucket.v, bucket.m, bucket.hp, result.optimizer._mode, False)
    model = result.model
    lines = []
    first_eta = result.rows[-1]["trials"][0]["eta"]
    for eta in [0.0, first_eta, 1e-1, 1e-3, 1e-5]:
        w = (w0 + eta * d).float()
        weight, bias = w[:640].view(10, 64), w[640:]
        f32 = float(torch.nn.functional.cross_entropy(x @ weight.t() + bias, y))
        f64 = float(torch.nn.functional.cross_entropy(x.double() @ weight.double().t() + bias.double(), y))
        lines.append({"eta": eta, "loss_fp32": f32, "loss_fp64": f64})
    logits = x @ model.weight.detach().t() + model.bias.detach()
    return {
        "step": step,
        "trials": result.rows[-1]["trials"][:3],
        "along_d": lines,
        "max_abs_logit": float(logits.abs().max()),
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    table = []
    for armijo in ("classic", "noise_aware"):
        result = diagnose.run("adamsls", armijo, EPOCHS, "linear", record_path=OUT / f"{armijo}.jsonl")
        diagnostics.plot(result.rows, OUT / f"{armijo}.png", f"AdamSLS, armijo={armijo}, digits logistic regression")
        summary = diagnostics.summarize(result.rows)
        loss, acc = evaluate(result.model)
        sizes = [r["step_sizes"][0] for r in result.rows]
        table.append(
            {
                "armijo": armijo,
                "min_step_size": min(sizes),
                "final_step_size": sizes[-1],
                "outcomes": summary["outcomes"],
                "absorbed_trials": summary["fully_absorbed_trials"],
                "within_noise_floor": summary["trials_within_noise_floor"],
                "train_loss": loss,
                "test_acc": acc,
                "closure_calls": sum(r["closure_calls"] for r in result.rows),
            }
        )
        print(diagnostics.format_summary(summary))
    anatomy = anatomy_of_the_first_failure()
    (OUT / "results.json").write_text(json.dumps({"table": table, "first_failure": anatomy}, indent=1))
    print(json.dumps({"table": table, "first_failure": anatomy}, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
