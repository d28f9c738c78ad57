"""Hugging Face ``Trainer`` integration: ``LineSearchTrainer`` supplies the closure that lsfused optimizers need.

    trainer = LineSearchTrainer(model=model, args=args, train_dataset=ds, optimizer_cls=lsfused.AdamSLS)
    trainer.train()

Each training step builds a closure from the batch (``compute_loss``), and the line-search optimizer runs forward,
backward and its trials itself; the Trainer's own ``optimizer.step()`` and scheduler step become no-ops. Gradient
accumulation is refused (a line search needs the loss of the very batch whose gradient it follows), and no
learning-rate scheduler is applied (the line search picks the step size); the logged "learning_rate" is the
optimizer's step size.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import Trainer

import lsfused


class _StepDone(torch.optim.Optimizer):
    """What the Trainer holds as its optimizer: the line-search optimizer's groups and state, with ``step()`` a
    no-op because ``LineSearchTrainer.training_step`` already stepped."""

    def __init__(self, inner: lsfused.LineSearchOptimizer):
        self.inner = inner
        self.defaults = inner.defaults
        self.param_groups = inner.param_groups
        self.state = inner.state
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}

    def step(self, closure=None):  # noqa: D102 - the step already happened
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


class _StepSizes(torch.optim.lr_scheduler.LRScheduler):
    """Reports the current step sizes as the learning rate; schedules nothing."""

    def __init__(self, inner: lsfused.LineSearchOptimizer):
        self.inner = inner

    def step(self, epoch=None) -> None:
        return None

    def get_last_lr(self) -> list[float]:
        return [g["step_size"] for g in self.inner.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


class LineSearchTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with an lsfused line-search optimizer.

    Args:
        optimizer_cls (default ``lsfused.AdamSLS``): an lsfused optimizer class. ``lsfused.PLASLS`` gets
            ``lsfused.components.bert_components(model)`` unless ``optimizer_kwargs`` has ``components``.
        optimizer_kwargs (dict, optional): keyword arguments for ``optimizer_cls``.
        other arguments: as ``transformers.Trainer``. A scheduler passed in ``optimizers`` is ignored with a warning.
    """

    def __init__(self, *args, optimizer_cls=None, optimizer_kwargs: dict[str, Any] | None = None, **kwargs):
        optimizers = kwargs.get("optimizers")
        if optimizers and optimizers[1] is not None:
            warnings.warn(
                "LineSearchTrainer ignores the learning-rate scheduler: the line search chooses the step size",
                stacklevel=2,
            )
            kwargs["optimizers"] = (optimizers[0], None)
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                "LineSearchTrainer does not support gradient_accumulation_steps > 1: a line search evaluates the loss "
                "of the batch whose gradient it follows; use a larger per-device batch instead"
            )
        self.optimizer_cls = optimizer_cls or lsfused.AdamSLS
        if not (isinstance(self.optimizer_cls, type) and issubclass(self.optimizer_cls, lsfused.LineSearchOptimizer)):
            raise ValueError(f"optimizer_cls must be an lsfused optimizer class, got {self.optimizer_cls!r}")
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.line_search: lsfused.LineSearchOptimizer | None = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            kwargs = dict(self.optimizer_kwargs)
            if self.optimizer_cls is lsfused.PLASLS:
                components = kwargs.pop("components", None) or lsfused.components.bert_components(model)
                trainable = [[p for p in comp if p.requires_grad] for comp in components]
                self.line_search = lsfused.PLASLS([c for c in trainable if c], **kwargs)
            else:
                params = [p for p in model.parameters() if p.requires_grad]
                self.line_search = self.optimizer_cls(params, **kwargs)
            self.optimizer = _StepDone(self.line_search)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.create_optimizer()
            self.lr_scheduler = _StepSizes(self.line_search)
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure():
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        return self.line_search.step(closure)
