"""Named optimizer factories for the demos: one entry per row of the comparison table.

A factory takes the model and the run's :class:`Context` and returns ``(optimizer, scheduler or None)``. Add a row
with ``register("name", factory)``; ``lsfused demo --optimizers name,...`` then runs it on both tasks. The name
``"adam-tuned"`` is not a factory: the comparison runs ``adam`` over a learning-rate sweep and keeps the best (see
``lsfused.apps.compare``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import lsfused


@dataclass(frozen=True)
class Context:
    """What a factory may need to know about the run.

    Attributes:
        steps: number of optimizer steps of the run (for a learning-rate schedule).
        components: the task's PLASLS split of a model.
        adam_lr: the task's Adam learning rate (the text task: the paper's 2e-5; digits: 1e-3).
        warmup_cosine: Adam's learning rate warms up linearly over 10% of the steps, then decays with a cosine (the
            paper's fine-tuning schedule); else it is constant.
    """

    steps: int
    components: Callable[[nn.Module], list[list[Tensor]]]
    adam_lr: float
    warmup_cosine: bool = False


Factory = Callable[[nn.Module, Context], tuple[torch.optim.Optimizer, object]]
OPTIMIZERS: dict[str, Factory] = {}
TUNED_ADAM = "adam-tuned"


def register(name: str, factory: Factory) -> None:
    """Add (or replace) a named optimizer of the demo table."""
    if not name or "," in name or name == TUNED_ADAM:
        raise ValueError(f"invalid optimizer name {name!r}")
    OPTIMIZERS[name] = factory


def names() -> tuple[str, ...]:
    """Every name ``--optimizers`` accepts."""
    return (*OPTIMIZERS, TUNED_ADAM)


def adam(model: nn.Module, ctx: Context, lr: float | None = None) -> tuple[torch.optim.Optimizer, object]:
    """torch Adam at ``lr`` (default: the task's), with the task's schedule."""
    opt = torch.optim.Adam(model.parameters(), lr=ctx.adam_lr if lr is None else lr)
    if not ctx.warmup_cosine:
        return opt, None
    n_warm = max(1, int(ctx.steps * 0.1))

    def factor(k: int) -> float:
        if k < n_warm:
            return (k + 1) / n_warm
        return 0.5 * (1.0 + math.cos(math.pi * (k - n_warm) / max(1, ctx.steps - n_warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _plasls(**kwargs):
    return lambda model, ctx: (lsfused.PLASLS(ctx.components(model), **kwargs), None)


def _plasls_authors(model: nn.Module, ctx: Context):
    """PLASLS as close to the authors' experiments as our driver goes: their trial order, the pooler left out (on
    BERT-style models); the joint phase's Armijo term stays the whole network's."""
    try:
        comps = lsfused.components.bert_components(model, include_pooler=False)
    except ValueError:  # not a BERT-style model: the task's split
        comps = ctx.components(model)
    return lsfused.PLASLS(comps, trial_point="sequential"), None


# The defaults.
register("adam", adam)
register("adamsls", lambda model, ctx: (lsfused.AdamSLS(model.parameters()), None))
register("plasls", _plasls())
register("salsa", lambda model, ctx: (lsfused.SaLSa(model.parameters()), None))
register("sgdsls", lambda model, ctx: (lsfused.SGDSLS(model.parameters()), None))
# Variants the defaults were chosen against (benchmarks/results/defaults.md).
register("adamsls-b0", lambda model, ctx: (lsfused.AdamSLS(model.parameters(), betas=(0.0, 0.999)), None))
register("plasls-paper", _plasls(betas=(0.0, 0.999), full_search_steps=1))
register("plasls-joint", _plasls(joint_check=True))
register("plasls-authors", _plasls_authors)
# Interpolating backtracking (docs/backtracking.md): same optimizers, fewer closure calls per step.
register(
    "adamsls-interpolate", lambda model, ctx: (lsfused.AdamSLS(model.parameters(), backtracking="interpolate"), None)
)
register("salsa-interpolate", lambda model, ctx: (lsfused.SaLSa(model.parameters(), backtracking="interpolate"), None))
# Skipping predictable trials (docs/skip_trials.md), at the defaults and with interpolation.
for _name, _cls in (("adamsls", lsfused.AdamSLS), ("salsa", lsfused.SaLSa)):
    for _suffix, _kwargs in (("", {}), ("-interpolate", {"backtracking": "interpolate"})):
        for _tag, _mode in (("skip", True), ("skip-measure", "measure")):
            register(
                f"{_name}{_suffix}-{_tag}",
                lambda model, ctx, cls=_cls, kw=_kwargs, mode=_mode: (
                    cls(model.parameters(), skip_trials=mode, **kw),
                    None,
                ),
            )
