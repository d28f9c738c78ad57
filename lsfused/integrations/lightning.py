"""PyTorch Lightning integration: train a ``LightningModule`` with any lsfused optimizer in automatic optimization.

    from lsfused.integrations.lightning import LineSearchModule

    class Model(LineSearchModule):          # instead of pl.LightningModule; nothing else changes
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return lsfused.AdamSLS(self.parameters())

    pl.Trainer(max_epochs=3, gradient_clip_val=1.0).fit(Model(), loader)

A line search needs the gradient at ``w0`` once and then the loss alone at each trial point. Lightning's closure
runs ``training_step``, ``zero_grad`` and ``backward`` (with their hooks); ``LineSearchModule.optimizer_step`` lets
Lightning run it exactly once per optimizer step, through Lightning's own step path (so ``on_before_optimizer_step``
runs once, ``trainer.global_step`` counts, precision plugins apply), then hands the optimizer a trial closure that
calls ``training_step`` on the same batch without ``backward`` and with ``self.log`` muted. Every closure call of a
step (Lightning's included) runs under the step's seed (``deterministic_closure``), so dropout is the same at ``w0``
and at every trial.

- ``Trainer(gradient_clip_val=v)`` becomes the optimizer's ``max_grad_norm = v`` (clipping in the optimizer, before
  the moments and the direction, norm in float64); ``gradient_clip_algorithm="value"`` is refused.
- ``LearningRateMonitor`` logs ``group["lr"]``, which lsfused keeps equal to the step size; an LR scheduler from
  ``configure_optimizers`` caps the step size (see :class:`lsfused.SGDSLS`).
- Checkpoints hold the optimizer's ``state_dict``: resuming is exact.
- ``accumulate_grad_batches > 1`` is refused (the line search needs the loss of the batch whose gradient it
  follows). Optimizers other than lsfused ones step as usual.
- If you override ``on_train_batch_start``, call ``super().on_train_batch_start(batch, batch_idx)``: it keeps the
  batch for the trials.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch

from lsfused.optim.base import LineSearchOptimizer


def _line_search(optimizer: Any) -> LineSearchOptimizer | None:
    """The lsfused optimizer behind Lightning's ``LightningOptimizer`` wrapper, or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, LineSearchOptimizer) else None


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor):
        raise ValueError(
            "LineSearchModule: training_step must return the loss (a tensor or a dict with 'loss') for the line search"
        )
    return loss


class LineSearchModule(pl.LightningModule):
    """A ``LightningModule`` whose lsfused optimizers step with a line search in automatic optimization.

    Subclass it instead of ``pl.LightningModule``; see the module docstring for what it maps and why.
    """

    _lsfused_batch: tuple[Any, int] | None = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Keep the batch: the line search's trials evaluate ``training_step`` on it again."""
        self._lsfused_batch = (batch, batch_idx)

    @contextlib.contextmanager
    def _muted(self) -> Iterator[None]:
        """``self.log``/``self.log_dict`` do nothing inside (trial evaluations are not training steps)."""
        self.log = self.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
        try:
            yield
        finally:
            del self.log, self.log_dict

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """For lsfused optimizers, ``gradient_clip_val`` becomes ``max_grad_norm``: the optimizer clips inside its
        step (Lightning would clip here, after the gradient evaluation and before the step: the same place)."""
        inner = _line_search(optimizer)
        if inner is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return None
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(
                f"lsfused optimizers clip by the global L2 norm (max_grad_norm); gradient_clip_algorithm="
                f"{gradient_clip_algorithm!r} is not supported: use 'norm'"
            )
        inner.max_grad_norm = float(gradient_clip_val)
        return None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:  # noqa: D102 - see the class docstring
        inner = _line_search(optimizer)
        if inner is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                "lsfused optimizers do not support accumulate_grad_batches > 1: a line search evaluates the loss of "
                "the batch whose gradient it follows; use a larger batch instead"
            )
        if self._lsfused_batch is None:
            raise RuntimeError(
                "LineSearchModule did not see the batch: call super().on_train_batch_start(batch, batch_idx) in your "
                "on_train_batch_start"
            )
        batch, index = self._lsfused_batch

        def trial() -> torch.Tensor:
            with self._muted():
                return _loss_of(self.training_step(batch, index))

        held: dict[str, Any] = {}

        def once() -> Any:
            # Lightning's closure (training_step, zero_grad, backward and their hooks), once, under the random state
            # of the step's trials (step_rng), so the optimizer compares them with this loss directly.
            with inner.step_rng():
                held["loss"] = optimizer_closure()
            return held["loss"]

        # An LR scheduler wraps ``step`` on the instance (to tell whether the optimizer stepped): keep its wrapper.
        wrapped = inner.__dict__.get("step")
        step = wrapped if wrapped is not None else type(inner).step.__get__(inner)

        def line_search_step(closure: Any = None, **kwargs: Any) -> torch.Tensor | None:
            # Lightning's precision plugin calls this with its wrapped closure (which runs ``once`` and then the
            # on_before_optimizer_step hook and clipping), or, with a GradScaler, without one after running it.
            if closure is not None:
                closure()
            loss = held.get("loss")
            if loss is None:  # training_step returned None: Lightning skips the step
                return None
            return step(trial, loss=loss)

        inner.step = line_search_step  # type: ignore[method-assign]
        try:
            optimizer.step(closure=once)
        finally:
            if wrapped is None:
                del inner.step
            else:
                inner.step = wrapped
        return None
