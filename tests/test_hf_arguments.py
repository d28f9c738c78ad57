"""LineSearchTrainer honours TrainingArguments: max_grad_norm and weight_decay through the optimizer's options,
the Trainer's scheduler as a step-size cap, one warning naming the fields it cannot honour. A tiny BERT, fast."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the demo extra (transformers) is not installed")

from test_hf import args as hf_args  # noqa: E402

import lsfused  # noqa: E402
from lsfused.integrations.hf import LineSearchTrainer  # noqa: E402


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.1,
    )
    return transformers.BertForSequenceClassification(config)


def dataset(n=32):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 40, (n, 12), generator=g)
    labels = ids[:, 0] % 3
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]  # fmt: skip


def train(tmp_path, optimizer_kwargs=None, cls=lsfused.AdamSLS, steps=3, **kw):
    kw = {"max_steps": steps, "lr_scheduler_type": "constant", "max_grad_norm": 0.0} | kw
    args = hf_args(tmp_path, **kw)
    model = tiny_bert()
    trainer = LineSearchTrainer(
        model=model, args=args, train_dataset=dataset(), optimizer_cls=cls, optimizer_kwargs=optimizer_kwargs
    )
    trainer.train()
    return trainer, [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("cls", [lsfused.AdamSLS, lsfused.SaLSa])
def test_max_grad_norm_and_weight_decay_equal_the_optimizer_options(tmp_path, cls):
    plain, w_plain = train(tmp_path, cls=cls)
    by_args, w_args = train(tmp_path, cls=cls, max_grad_norm=0.05, weight_decay=0.1)
    _, w_clip_only = train(tmp_path, cls=cls, max_grad_norm=0.05)
    assert by_args.line_search.max_grad_norm == 0.05
    assert by_args.line_search.last_step.grad_norm > 0.05  # clipping binds
    groups = by_args.line_search.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # HF's split: no decay on biases and LayerNorm
    no_decay = {n for n, _ in by_args.model.named_parameters()} - set(by_args.get_decay_parameter_names(by_args.model))
    assert any("bias" in n for n in no_decay) and len(groups[1]["params"]) == len(no_decay)

    class Options(LineSearchTrainer):  # the same groups and options, given to the optimizer directly
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = self.model
                decay = set(self.get_decay_parameter_names(model))
                named = list(model.named_parameters())
                self.line_search = cls(
                    [
                        {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
                        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                    ],
                    max_grad_norm=0.05,
                )
                from lsfused.integrations.hf import _StepDone

                self.optimizer = _StepDone(self.line_search)
            return self.optimizer

    args = by_args.args
    model = tiny_bert()
    Options(model=model, args=args, train_dataset=dataset(), optimizer_cls=cls).train()
    assert _same(w_args, [p.detach() for p in model.parameters()])
    assert not _same(w_args, w_plain) and not _same(w_args, w_clip_only) and not _same(w_clip_only, w_plain)


def test_trainer_does_not_clip_after_the_step_and_logs_the_optimizer_norm(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Trainer clipped the gradient after the line search had used it")

    monkeypatch.setattr(transformers.Trainer, "_clip_grad_norm", refuse, raising=False)
    trainer, _ = train(tmp_path, max_grad_norm=0.05, steps=3)
    logged = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    assert len(logged) == 3
    assert logged[-1] == trainer.line_search.last_step.grad_norm > 0.05  # the pre-clip norm


def test_linear_warmup_caps_the_step_size_and_the_logged_rate_is_the_step_size(tmp_path):
    trainer, _ = train(tmp_path, lr_scheduler_type="linear", warmup_steps=2, steps=6)
    opt = trainer.line_search
    init = opt.param_groups[0]["init_step_size"]
    group = opt.param_groups[0]
    # the cap of the 6th step of a linear decay over steps 2..6 (it binds: 0.025 is below the searched step size)
    assert group["max_step_size"] == pytest.approx(init * (6 - 5) / (6 - 2))
    rates = [row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row]
    assert rates[0] == 0.0  # the warm-up's first step: cap 0
    assert rates[-1] == min(group["step_size"], group["max_step_size"]) == group["max_step_size"]
    assert group["lr"] == 0.0  # the scheduler's value for a 7th step, written after the last one


def test_unhonoured_arguments_are_named_once(tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, adam_beta1=0.8, report_to=[], use_cpu=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LineSearchTrainer(model=tiny_bert(), args=args, train_dataset=dataset())
    messages = [str(w.message) for w in caught if "does not use TrainingArguments" in str(w.message)]
    assert len(messages) == 1
    assert "learning_rate" in messages[0] and "adam_beta1" in messages[0] and "adam_beta2" not in messages[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LineSearchTrainer(model=tiny_bert(), args=transformers.TrainingArguments(str(tmp_path), report_to=[]))
    assert not any("does not use TrainingArguments" in str(w.message) for w in caught)
