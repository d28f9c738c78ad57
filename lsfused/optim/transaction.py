"""A step as a transaction: the block whose failure is undone (``undone_on_error``), Ctrl-C held back while a pass
or the undoing must not stop half way, the closure runner (each call counted, seeded and refused ``backward()``),
and one closure evaluation that every rank ends alike.

The optimizer supplies what undoing means (parameters back at ``w0``, its search state as before); what is here
only runs code and returns values.
"""

from __future__ import annotations

import _signal
import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor

from lsfused.optim import distributed, validation

_BACKWARD_REFUSED = (
    "the closure called backward(): lsfused optimizers run backward themselves (once, then the closure under "
    "torch.no_grad() for each trial). Return the loss from the closure without calling backward() or zero_grad(). "
    "A framework whose closure runs backward (Lightning's automatic optimization) needs lsfused.integrations (see "
    "the README); with your own forward and backward, call step(closure, loss=loss) with a closure that only "
    "computes the loss"
)


@contextmanager
def backward_refused() -> Iterator[None]:
    """While a closure runs, ``backward()`` from this thread raises a ValueError that says what to do instead (it would
    otherwise fail later with torch's "backward through the graph a second time" or, under no_grad, "does not
    require grad"). ``Tensor.backward`` calls ``torch.autograd.backward``, which is swapped for the call."""
    original = torch.autograd.backward
    owner = threading.get_ident()

    def refuse(*args: Any, **kwargs: Any) -> None:
        if threading.get_ident() != owner:
            return original(*args, **kwargs)
        raise ValueError(_BACKWARD_REFUSED)

    torch.autograd.backward = refuse
    try:
        yield
    finally:
        torch.autograd.backward = original


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, for the few passes that must not stop half way."""
    # _signal: the signal module's C functions, without its enum conversions (most of this block's cost per step).
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _signal.getsignal(signal.SIGINT)
    if not callable(handler):
        yield
        return
    received: list[tuple[int, Any]] = []
    _signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        _signal.signal(signal.SIGINT, handler)
        if received:
            handler(*received[0])


@contextmanager
def undone_on_error(undo: Callable[[BaseException], None]) -> Iterator[None]:
    """Run the block as a transaction: whatever it raises (``KeyboardInterrupt`` included) is first handed to
    ``undo``, with Ctrl-C held back so that the undoing is never cut short, then propagates."""
    try:
        yield
    except BaseException as err:
        with sigint_deferred():
            undo(err)
        raise


_GRADIENT_CHANGED = (
    "the closure changed the gradient in place during the step's trials (opt.zero_grad(), "
    "model.zero_grad(set_to_none=False) or an in-place op on a .grad): the optimizer recomputes the search direction "
    "from the gradient at every trial, so the closure must leave it alone. Return the loss without zeroing the "
    "gradient (the optimizer zeroes it itself before its backward); the parameters are back at w0"
)


class ClosureRunner:
    """A step's closure as the step calls it: counted (``calls``), with ``backward()`` refused, and each call under
    the random state ``random_state()`` enters (None: the caller's). After ``freeze(tensors)`` (the gradient, once
    Pass A read it) a call that changed one of them in place raises a ValueError: the trials recompute the direction
    from it. torch's version counter tells, without reading the data."""

    def __init__(self, closure: Callable[[], Tensor], random_state: Callable[[], AbstractContextManager] | None):
        self.closure, self.random_state, self.calls = closure, random_state, 0
        self._frozen: list[tuple[Tensor, int]] = []

    def freeze(self, tensors: list[Tensor]) -> None:
        self._frozen = [(t, t._version) for t in tensors]

    def __call__(self) -> Tensor:
        self.calls += 1
        with backward_refused():
            if self.random_state is None:
                out = self.closure()
            else:
                with self.random_state():
                    out = self.closure()
        if any(t._version != version for t, version in self._frozen):
            raise ValueError(_GRADIENT_CHANGED)
        return out


def evaluate(
    run: Callable[[], Tensor], where: str, grad: bool, group: Any, device: torch.device
) -> tuple[Tensor, float]:
    """Evaluate the closure once: its output and the float64 loss (under ``torch.distributed``, the mean over the
    ranks of ``group``). When the closure raises on one rank, every rank raises at this same call, so that every
    rank ends the step the same way (the failing rank with its own exception)."""
    try:
        with torch.set_grad_enabled(grad):
            out = run()
        value = validation.loss(out, where)
    except BaseException:
        if group is not None:
            distributed.all_reduce([math.nan, 1.0], group, device, average=False)  # the other ranks wait for it
        raise
    if group is None:
        return out, value
    total, failed = distributed.all_reduce([value, 0.0], group, device, average=False)
    if failed:
        raise RuntimeError(
            f"another rank raised inside the closure {where}; this rank ends the step the same way (the "
            "parameters are back at w0, see the failing rank's error)"
        )
    return out, total / distributed.world_size(group)
