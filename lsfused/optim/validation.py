"""Validation of everything a user hands the optimizer: hyperparameters (constructor and ``load_state_dict``
alike), param groups and what a closure returns.

A bad value raises a ValueError naming the key and the value, before anything changes. Booleans are not numbers
here (True would pass as 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from lsfused.optim.acceptance import ARMIJO_TESTS
from lsfused.optim.skipping import MODES as SKIP_MODES


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive(name: str, value: float) -> None:
    if not (number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def in_range(name: str, value: float, lo: float, hi: float, hi_open: bool = True) -> None:
    ok = number(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")


def open_interval(name: str, value: float, lo: float, hi: float) -> None:
    if not (number(value) and lo < value < hi):
        raise ValueError(f"{name} must be in ({lo}, {hi}), got {value!r}")


def finite_at_least(name: str, value: float, lo: float) -> None:
    if not (number(value) and math.isfinite(value) and value >= lo):
        raise ValueError(f"{name} must be a finite number >= {lo}, got {value!r}")


def finite(name: str, value: float) -> None:
    if not (number(value) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def int_at_least(name: str, value: int, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def boolean(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")


def choice(name: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def betas(value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value!r}")
    in_range("betas[0]", value[0], 0.0, 1.0)
    in_range("betas[1]", value[1], 0.0, 1.0)


def lr_cap(name: str, lr: Any) -> float:
    """A value found in ``group["lr"]`` (a number, or a one-element tensor as some schedulers write), validated."""
    if isinstance(lr, Tensor) and lr.numel() == 1:
        lr = lr.item()
    finite_at_least(name, lr, 0.0)
    return float(lr)


def step_value(t: Any, index: int) -> int:
    """A saved per-parameter ``step``: a whole number >= 0 (a scalar tensor, as torch's Adam saves it, or a number)."""
    value = t.item() if isinstance(t, Tensor) and t.numel() == 1 else t
    ok = number(value) and math.isfinite(value) and value >= 0 and float(value).is_integer()
    if not ok:
        raise ValueError(f"state_dict step of parameter {index} must be a whole number >= 0, got {value!r}")
    return int(value)


def options(
    *,
    deterministic_closure: Any,
    armijo: Any,
    skip_trials: Any,
    estimate_noise: Any,
    max_grad_norm: Any,
    loss_scale: Any,
) -> None:
    """The options every optimizer takes (see ``LineSearchOptimizer``)."""
    boolean("deterministic_closure", deterministic_closure)
    choice("armijo", armijo, ARMIJO_TESTS)
    if not any(skip_trials is mode or skip_trials == mode and isinstance(mode, str) for mode in SKIP_MODES):
        raise ValueError(f"skip_trials must be False, True or 'measure', got {skip_trials!r}")
    boolean("estimate_noise", estimate_noise)
    if max_grad_norm is not None:
        positive("max_grad_norm", max_grad_norm)
    if not (loss_scale is None or loss_scale == "dynamic"):
        positive('loss_scale (None, "dynamic" or a positive number)', loss_scale)


def group_values(
    groups: list[dict[str, Any]], search_keys: tuple[str, ...], validate_group: Callable[[dict[str, Any]], None]
) -> None:
    """The hyperparameters of ``groups``: each by ``validate_group`` (the optimizer's own), the step size and its cap,
    and the line-search keys ``search_keys`` equal in every group (one global search)."""
    first = groups[0]
    for i, group in enumerate(groups):
        validate_group(group)
        pending_auto = group.get("init_step_size") == "auto" and group.get("step_size") == 0.0
        if "step_size" in group and not pending_auto:
            positive("step_size", group["step_size"])
        if group.get("max_step_size") is not None:
            finite_at_least(f"param group {i}'s max_step_size", group["max_step_size"], 0.0)
        for key in search_keys:
            if group[key] != first[key]:
                raise ValueError(
                    f"param group {i} sets {key}={group[key]!r} but group 0 has {first[key]!r}; line-search "
                    f"hyperparameters ({', '.join(search_keys)}) must be the same in every group"
                )


def group_params(groups: list[dict[str, Any]]) -> None:
    """Every parameter real floating point and dense, and each group on one device."""
    for i, group in enumerate(groups):
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"param group {i} mixes devices {sorted(map(str, devices))}; put each in its own group")
        for p in group["params"]:
            if p.is_complex():
                raise ValueError("lsfused optimizers do not support complex parameters")
            if not p.is_floating_point():
                raise ValueError(f"parameters must be floating point, got {p.dtype}")
            if p.is_sparse:
                raise ValueError("lsfused optimizers do not support sparse parameters")


def unique_params(params: list[Tensor], index: int) -> list[Tensor]:
    """A group's parameters with tied weights counted once; an empty group refused."""
    unique, seen = [], set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    if not unique:
        raise ValueError(f"param group {index} has no parameters; every param group needs at least one")
    return unique


def loss(value: Any, where: str) -> float:
    """What a closure returned, validated: its float64 value."""
    if not isinstance(value, Tensor):
        raise TypeError(f"the closure must return the loss as a torch.Tensor, got {type(value).__name__} {where}")
    if value.numel() != 1:
        raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)} {where}")
    if value.is_complex():
        raise ValueError(f"the closure returned a complex loss {where}")
    return float(value.item())  # exact: every floating dtype converts to a Python float (float64) exactly


def finite_loss(f0: float) -> None:
    if not math.isfinite(f0):
        raise ValueError(f"the loss at the starting point is not finite ({f0}); the step was refused")
