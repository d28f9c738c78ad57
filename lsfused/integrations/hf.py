"""Hugging Face ``Trainer`` integration: ``LineSearchTrainer`` supplies the closure that lsfused optimizers need.

    trainer = LineSearchTrainer(model=model, args=args, train_dataset=ds, optimizer_cls=lsfused.AdamSLS)
    trainer.train()

Each training step builds a closure from the batch (``compute_loss``), and the line-search optimizer runs forward,
backward and its trials itself; the Trainer's own ``optimizer.step()`` becomes a no-op. What the
``TrainingArguments`` become:

- ``max_grad_norm`` (HF default 1.0; 0 turns it off): the optimizer's ``max_grad_norm``, so the gradient is clipped
  before the line search uses it (the Trainer's own clipping, which would run after the step, is off); the logged
  ``grad_norm`` is the optimizer's pre-clip norm.
- ``weight_decay``: the optimizer's decoupled ``weight_decay``, on the parameters the Trainer decays (not biases and
  norm weights: two param groups); PLASLS, whose param groups are its components, decays every parameter.
- ``lr_scheduler_type``, ``warmup_steps``/``warmup_ratio``, ``lr_scheduler_kwargs``: the Trainer's scheduler caps
  the step size (see :class:`lsfused.SGDSLS`): its peak is the optimizer's step size at the start
  (``init_step_size``), so ``"linear"`` gives a linear warm-up of the cap and its decay to 0 at the end;
  ``"constant"`` without warm-up adds no cap.
- Explicit ``optimizer_kwargs`` win over the arguments above. The logged "learning_rate" is the step size.
- Not honoured, with one warning naming each one set away from its default: ``learning_rate`` (the line search picks
  the step size), ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``, ``optim``, ``optim_args`` (pass the optimizer's
  own options in ``optimizer_kwargs``), ``fp16`` (the Trainer's GradScaler never sees the line search's backward:
  use ``optimizer_kwargs={"loss_scale": "dynamic"}``). Gradient accumulation is refused (a line search needs the
  loss of the very batch whose gradient it follows).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

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
        return [g["lr"] for g in self.inner.param_groups]

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
        other arguments: as ``transformers.Trainer``; see the module docstring for what each ``TrainingArguments``
            field does. A scheduler passed in ``optimizers`` is ignored with a warning.
    """

    #: TrainingArguments fields without a meaning for a line search (warned about when set away from the default)
    UNUSED_ARGUMENTS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "optim_args", "fp16")

    def __init__(self, *args, optimizer_cls=None, optimizer_kwargs: dict[str, Any] | None = None, **kwargs):
        optimizers = kwargs.get("optimizers")
        if optimizers and optimizers[1] is not None:
            warnings.warn(
                "LineSearchTrainer ignores the learning-rate scheduler: the line search chooses the step size",
                stacklevel=2,
            )
            kwargs["optimizers"] = (optimizers[0], None)
        # Refused before the Trainer builds its Accelerator, whose process-wide GradientState would keep the setting
        # (and make lsfused refuse every later step, see rng.refuse_accelerate_accumulation).
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "gradient_accumulation_steps", 1) > 1:
            raise ValueError(
                "LineSearchTrainer does not support gradient_accumulation_steps > 1: a line search evaluates the loss "
                "of the batch whose gradient it follows; use a larger per-device batch instead"
            )
        super().__init__(*args, **kwargs)
        self.optimizer_cls = optimizer_cls or lsfused.AdamSLS
        if not (isinstance(self.optimizer_cls, type) and issubclass(self.optimizer_cls, lsfused.LineSearchOptimizer)):
            raise ValueError(f"optimizer_cls must be an lsfused optimizer class, got {self.optimizer_cls!r}")
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.line_search: lsfused.LineSearchOptimizer | None = None
        fields = TrainingArguments.__dataclass_fields__
        unused = [
            name for name in self.UNUSED_ARGUMENTS if getattr(self.args, name) != getattr(fields[name], "default", None)
        ]
        if unused:
            warnings.warn(
                f"LineSearchTrainer does not use TrainingArguments {', '.join(unused)}: the line search picks the step "
                "size; pass the optimizer's own options in optimizer_kwargs (fp16: {'loss_scale': 'dynamic'})",
                stacklevel=2,
            )

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            kwargs = dict(self.optimizer_kwargs)
            kwargs.setdefault("max_grad_norm", self.args.max_grad_norm or None)  # 0 (or None): no clipping
            weight_decay = kwargs.pop("weight_decay", self.args.weight_decay)
            if self.optimizer_cls is lsfused.PLASLS:
                components = kwargs.pop("components", None) or lsfused.components.bert_components(model)
                trainable = [[p for p in comp if p.requires_grad] for comp in components]
                self.line_search = lsfused.PLASLS([c for c in trainable if c], weight_decay=weight_decay, **kwargs)
            else:
                named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                params: list[Any] = [p for _, p in named]
                if weight_decay:  # the Trainer's split: no decay on biases and norm weights
                    decay = set(self.get_decay_parameter_names(model))
                    groups = [
                        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
                        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                    ]
                    params = [g for g in groups if g["params"]]
                self.line_search = self.optimizer_cls(params, **kwargs)
            self.optimizer = _StepDone(self.line_search)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.create_optimizer()
            if self.args.lr_scheduler_type == "constant" and not self.args.get_warmup_steps(num_training_steps):
                self.lr_scheduler = _StepSizes(self.line_search)
            else:  # the Trainer's own schedule, on the step-size cap ("lr" written by a scheduler caps the step)
                super().create_scheduler(num_training_steps, self.optimizer)
        return self.lr_scheduler

    def _get_learning_rate(self) -> float:
        """The step size after the step (``group["lr"]``), not the scheduler's cap."""
        return float(self.line_search.param_groups[0]["lr"])

    def _clip_grad_norm(self, model) -> float | None:
        """The optimizer clipped before its line search; report its pre-clip norm instead of clipping again."""
        return self.line_search.last_step.grad_norm if self.line_search.last_step else None

    def _get_grad_norm(self, model, grad_norm=None) -> float | None:
        return self._clip_grad_norm(model) if grad_norm is None else grad_norm

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure():
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        return self.line_search.step(closure)
