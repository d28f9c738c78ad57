"""The state_dict format: torch's shape, and the conversion of the format before it.

A state_dict holds only ``state`` and ``param_groups``, as torch's optimizers' do, because the tools around an
optimizer (``torch.distributed.checkpoint``, HF accelerate, Lightning's strategies) keep only those two keys:

- ``state[i]``: per parameter, ``step`` (a float64 scalar tensor, as torch's Adam has: the steps this parameter's
  group has taken) and the moments ``exp_avg``/``exp_avg_sq`` where the optimizer has them (DTensors for FSDP2
  parameters, so that DCP can reshard them). Tensor-valued optimizer-wide state (PLASLS's generator) sits in the
  first parameter's state, as torch's LBFGS keeps its optimizer-wide state.
- ``param_groups[g]``: the hyperparameters, ``step_size``, ``max_step_size``, ``lr``, and ``search_state``: the
  optimizer-wide search state as plain values (the optimizer's name, the closure seed, the loss scale, PLASLS's
  components/cursor/merges, SaLSa's smoothing state), the same in every group. Its containers are tuples, which
  DCP stores as one value whatever they hold (a list of dicts would be split into keys that a fresh optimizer's
  state_dict, the template DCP loads into, does not have).

Everything here takes values and returns values; the optimizer validates what it loads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lsfused.flat import is_sharded

#: the format version 1 state_dict carried its optimizer-wide state in this extra top-level entry
V1_KEY = "lsfused"


def plain(value: Any) -> Any:
    """``value`` with every list turned into a tuple (dicts kept): a copy that DCP stores as one value."""
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def unplain(value: Any) -> Any:
    """The inverse of :func:`plain` for the optimizer's own state: tuples back to lists, down to the first dict,
    whose values stay as they are (PLASLS's components are lists of lists, a merge record's pairs are tuples)."""
    if isinstance(value, (list, tuple)):
        return [unplain(v) for v in value]
    if isinstance(value, dict):
        return dict(value)
    return value


def export_tensor(param: Tensor, t: Tensor) -> Tensor:
    """A copy of the state tensor ``t`` of ``param`` for a state_dict: for an FSDP2 parameter a moment (its local
    shard) becomes a DTensor laid out like the parameter, so that DCP saves every rank's shard and can reshard."""
    copy = t.detach().clone()
    if is_sharded(param) and t.dim() > 0:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            copy, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    return copy


def local_tensor(t: Any) -> Any:
    """The local shard of a loaded DTensor (a state_dict of an FSDP2 optimizer), anything else as it is."""
    return t.to_local() if is_sharded(t) else t


def step_tensor(step: int | list[int]) -> Tensor:
    """A per-parameter ``step`` as torch's Adam keeps it (a scalar tensor; float64, so that counts past 2**24 stay
    exact: torch's Adam loads it as its own dtype); or several."""
    return torch.tensor(step, dtype=torch.float64)


def from_v1(state_dict: dict[str, Any], extra_keys: set[str], tensor_keys: set[str]) -> dict[str, Any]:
    """A version-1 state_dict (``{"state", "param_groups", "lsfused": {...}}``, its ``lsfused`` entry already
    checked by the caller) in the current format. Of the old ``extra`` state, ``extra_keys`` go to
    ``search_state`` and ``tensor_keys`` to the first parameter's state; the rest (the single component of
    SGDSLS/AdamSLS) is dropped. The old ``lr_written`` is not carried: the current format derives it from
    ``step_size`` and ``max_step_size``, as the optimizer last wrote it."""
    meta = state_dict[V1_KEY]
    extra = meta["extra"]
    tensors = {k: extra[k] for k in tensor_keys if k in extra}
    scale = meta.get("loss_scale")
    search_state = {
        "optimizer": meta.get("optimizer"),
        "seed": meta.get("seed"),
        "loss_scale": scale.get("scale") if isinstance(scale, dict) else None,
        "loss_scale_tracker": scale.get("tracker") if isinstance(scale, dict) else None,
        **{k: plain(extra[k]) for k in extra_keys if k in extra},
    }
    groups = state_dict.get("param_groups")
    if isinstance(groups, list):
        groups = [{**g, "search_state": dict(search_state)} if isinstance(g, dict) else g for g in groups]
    state = state_dict.get("state")
    if isinstance(state, dict):
        state = {k: {**v, "step": step_tensor(meta["step"])} if isinstance(v, dict) else v for k, v in state.items()}
        first = 0 if 0 in state else "0"
        if isinstance(state.get(first), dict):
            state[first] = {**state[first], **tensors}
    return {"state": state, "param_groups": groups}
