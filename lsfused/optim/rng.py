"""Random state of a step: the generators a step seeds, the hooks of ``watch()``, and what ``loss=`` steps refuse.

Every closure call of a step runs under one random state (the step's seed, or generator states replayed) so that
dropout masks agree between ``f(w0)``, the gradient and the trials. The caller's RNG state is restored after each.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


def generators(devices: list[torch.device]) -> list[torch.Generator]:
    """The CPU generator and those of the GPUs in ``devices`` (not every GPU's: ``torch.manual_seed`` would seed the
    others without restoring them)."""
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    if cuda:
        torch.cuda.init()  # default_generators is filled in by CUDA's (lazy) initialisation
    return [torch.default_generator] + [torch.cuda.default_generators[i] for i in cuda]


def capture(gens: list[torch.Generator]) -> list[Tensor]:
    return [gen.get_state() for gen in gens]


@contextmanager
def seeded(gens: list[torch.Generator], seed: int, states: list[Tensor] | None = None) -> Iterator[None]:
    """Run the block with ``gens`` seeded with ``seed`` (or set to ``states``); their states are restored after."""
    saved = capture(gens)
    try:
        for i, gen in enumerate(gens):
            if states is None:
                gen.manual_seed(seed)
            else:
                gen.set_state(states[i])
        yield
    finally:
        for gen, state in zip(gens, saved, strict=True):
            gen.set_state(state)


class WatchHooks:
    """The forward pre-hook and forward hook ``watch()`` registers. They hold the optimizer weakly (a watched model
    does not keep its optimizer's buffers alive), and copies or pickles of the model carry them detached (doing
    nothing): a copy's forward belongs to no optimizer until ``watch()`` is called for it."""

    def __init__(self, optimizer: Any, module: torch.nn.Module):
        self._optimizer = weakref.ref(optimizer)
        self.handles = [
            module.register_forward_pre_hook(self.enter),
            module.register_forward_hook(self.leave, always_call=True),
        ]

    def enter(self, module: torch.nn.Module, args: Any) -> None:
        opt = self._optimizer()
        if opt is not None:
            opt._forward_starts()

    def leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        opt = self._optimizer()
        if opt is not None:
            opt._forward_ends()

    def remove(self) -> None:
        """Remove both hooks."""
        for h in self.handles:
            h.remove()

    def __getstate__(self) -> dict[str, Any]:
        return {"handles": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.handles = state["handles"]
        self._optimizer = lambda: None


def refuse_accelerate_accumulation() -> None:
    """accelerate's gradient accumulation sums micro-batch gradients and steps once: a line search would compare the
    losses of one micro-batch along the direction of another. Refused, as in the HF and Lightning integrations. The
    setting lives in accelerate's process-wide ``GradientState``: the last ``Accelerator`` built decides."""
    state = sys.modules.get("accelerate.state")
    gradient_state = getattr(state, "GradientState", None)
    if gradient_state is None or not gradient_state._shared_state:  # no Accelerator in this process
        return
    steps = gradient_state().num_steps
    if steps > 1:
        raise ValueError(
            f"lsfused optimizers do not support accelerate's gradient_accumulation_steps={steps}: a line search "
            "evaluates the loss of the batch whose gradient it follows; use a larger batch instead"
        )


def replay_states(
    step: int, vouched_step: int, watched_step: int, captured: tuple[int, list[Tensor]] | None
) -> list[Tensor] | None:
    """For a ``loss=`` step: the generator states its closure calls replay. None (the step's seed) when the caller's
    forward ran under it (``step_rng`` vouched for ``vouched_step``, a ``watch`` hook seeded ``watched_step``) or
    when ``zero_grad()`` captured nothing for this step; else the states ``zero_grad()`` saw (``captured``), which
    the caller's forward started from unless something drew random numbers in between (the step checks that)."""
    if vouched_step == step or watched_step == step or captured is None:
        return None
    captured_step, states = captured
    return states if captured_step == step else None


def mismatch_warning(name: str, given: float, replayed: float, watched: bool, captured: bool) -> str:
    """The caller's loss could not be matched, so this step (and each such step) runs its own forward and backward:
    say so, naming the cheap fix for the loop at hand (``watched``: a ``watch`` hook seeded the forward;
    ``captured``: ``zero_grad()`` saw the state replayed)."""
    return (
        f"{name}.step(closure, loss=loss): the closure's loss at the starting point under the random state of the "
        f"trials ({replayed!r}) differs from the loss passed ({given!r}), so the gradient does not belong to the "
        "losses the search compares (dropout masks). This step, and every such step, falls back to one more forward "
        f"and backward of the closure. Cheap fix: {_fix(watched, captured)}"
    )


def _fix(watched: bool, captured: bool) -> str:
    """The cheap fix to name when the caller's loss could not be matched, for the loop at hand."""
    if watched:
        return (
            "the watched module's forward ran under the step's random state, yet the closure's loss differs: is the "
            "module called more than once for this loss, or are random numbers drawn outside it? Compute the loss "
            "inside `with opt.step_rng():`"
        )
    if captured:
        return (
            "random numbers were drawn between opt.zero_grad() and the forward (a sampler, an augmentation), or the "
            "closure computes another loss than the one passed: call opt.watch(model) once before the loop (its "
            "forward then runs under the step's random state)"
        )
    return "call opt.watch(model) once before the loop (its forward then runs under the step's random state)"
