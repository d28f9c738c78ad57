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

Everything here takes values and returns values: :func:`pack` builds a state_dict, and the ``checked_*`` functions
validate what ``load_state_dict`` is given (with the constructor's validators) and return what it commits.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lsfused.flat import is_sharded
from lsfused.optim import validation
from lsfused.optim.passes import MOMENTS
from lsfused.optim.skipping import TrialSkipper

#: the format version 1 state_dict carried its optimizer-wide state in this extra top-level entry
V1_KEY = "lsfused"
#: param-group keys a state_dict may have or lack: the step-size cap's (older state dicts lack them), and those that
#: torch's LR schedulers, SWALR and named parameters add to the groups
OPTIONAL_KEYS = {"lr", "max_step_size", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum"}
OPTIONAL_KEYS |= {"base_momentum", "swa_lr"}
#: the entries of every optimizer's search_state; the rest is the optimizer's own (``_extra_state``)
SEARCH_STATE_KEYS = {"optimizer", "seed", "loss_scale", "loss_scale_tracker", "trial_skipping"}


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


def pack(param_groups: list[dict[str, Any]], state: dict[Tensor, dict[str, Tensor]], search: dict[str, Any]) -> dict:
    """The state_dict of an optimizer: copies of its param groups (``params`` as indices, ``search_state`` =
    ``search``) and of every parameter's state (the moments exported by :func:`export_tensor`)."""
    packed_state: dict[int, dict[str, Tensor]] = {}
    groups = []
    for group in param_groups:
        packed = {k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", "search_state")}
        packed["search_state"] = copy.deepcopy(search)
        packed["params"] = []
        for p in group["params"]:
            index = len(packed_state)
            packed_state[index] = {k: export_tensor(p, v) if k in MOMENTS else v.clone() for k, v in state[p].items()}
            packed["params"].append(index)
        groups.append(packed)
    return {"state": packed_state, "param_groups": groups}


def checked_v1(state_dict: dict[str, Any], name: str, layout: list) -> None:
    """The ``lsfused`` entry of a version-1 state_dict for optimizer ``name`` over parameters of ``layout``."""
    meta = state_dict[V1_KEY]
    if not isinstance(meta, dict):
        raise ValueError(f"not an lsfused state_dict ('lsfused' is not a dict); cannot load it into {name}")
    meta_keys = ("optimizer", "version", "layout", "step", "seed", "extra")
    missing = [f"lsfused.{k}" for k in meta_keys if k not in meta]
    if missing:
        raise ValueError(f"state_dict lacks {missing}; cannot load it into {name}")
    if meta["optimizer"] != name:
        raise ValueError(f"state_dict was saved by {meta['optimizer']!r}, cannot load it into {name}")
    if meta["version"] != 1:
        raise ValueError(f"unsupported lsfused state_dict version {meta['version']!r}")
    if meta["layout"] != layout:
        raise ValueError(
            f"state_dict parameter layout does not match this {name}: saved groups/shapes {meta['layout']} vs {layout}"
        )
    validation.int_at_least("state_dict step", meta["step"], 0)
    if not isinstance(meta["extra"], dict):
        raise ValueError(f"state_dict entry lsfused.extra must be a dict, got {type(meta['extra']).__name__}")


def checked_groups(
    saved: Any,
    param_groups: list[dict[str, Any]],
    name: str,
    check_values: Callable[[list[dict[str, Any]]], None],
    search_keys: set[str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The saved param groups' hyperparameters (without ``params`` and ``search_state``), validated by
    ``check_values`` as the constructor's are, and their (common) ``search_state``, which must hold ``search_keys``
    (and may hold ``trial_skipping``)."""
    if not isinstance(saved, list) or len(saved) != len(param_groups):
        n = len(saved) if isinstance(saved, list) else type(saved).__name__
        raise ValueError(f"state_dict has {n} param groups, this optimizer has {len(param_groups)}")
    if not all(isinstance(entry, dict) for entry in saved):
        bad = next(i for i, entry in enumerate(saved) if not isinstance(entry, dict))
        raise ValueError(f"state_dict param group {bad} must be a dict, got {type(saved[bad]).__name__}")
    if not all(isinstance(entry.get("search_state"), dict) for entry in saved):
        raise ValueError(
            f"not an lsfused state_dict (its param groups have no 'search_state'); cannot load it into {name}"
        )
    search = saved[0]["search_state"]
    if search.get("optimizer") != name:
        raise ValueError(f"state_dict was saved by {search.get('optimizer')!r}, cannot load it into {name}")
    if any(entry["search_state"] != search for entry in saved):
        raise ValueError("state_dict param groups disagree on search_state (it is the same in every group)")
    out = []
    for i, (group, entry) in enumerate(zip(param_groups, saved, strict=True)):
        params, n = entry.get("params"), len(group["params"])
        if not isinstance(params, (list, tuple)) or len(params) != n:
            got = len(params) if isinstance(params, (list, tuple)) else repr(params)
            raise ValueError(
                f"state_dict parameter layout does not match this {name}: param group {i} lists {got} "
                f"parameters, this optimizer's has {n}"
            )
        keys = set(entry) - {"params", "search_state"}
        expected = set(group) - {"params", "search_state"}
        missing, unknown = expected - keys - OPTIONAL_KEYS, keys - expected - OPTIONAL_KEYS
        if missing or unknown:
            what = [f"missing {sorted(missing)}"] * bool(missing) + [f"unknown {sorted(unknown)}"] * bool(unknown)
            raise ValueError(f"state_dict param group {i} has keys {' and '.join(what)}")
        values = copy.deepcopy({k: entry[k] for k in keys})  # the optimizer's own, as torch's load makes them
        if "lr" in values:
            validation.lr_cap(f'state_dict param group {i}\'s "lr"', values["lr"])
        out.append({"max_step_size": None, **values})
    try:
        check_values(out)
    except ValueError as err:
        raise ValueError(f"state_dict: {err}") from None
    # trial_skipping may be there or not: a checkpoint of a run with or without skip_trials loads either way.
    expected = search_keys - {"trial_skipping"}
    if set(search) - {"trial_skipping"} != expected:
        raise ValueError(
            f"state_dict search_state lacks {sorted(expected - set(search))} and has unknown "
            f"{sorted(set(search) - expected)}"
        )
    return out, search


def checked_run_state(search: dict[str, Any]) -> None:
    """The line search's own entries of a ``search_state`` (which holds them, see :func:`checked_groups`): the
    closure seed, the loss scale and ``skip_trials``' state."""
    validation.int_at_least("state_dict seed", search["seed"], 0)
    if search["loss_scale"] is not None:
        validation.positive("state_dict loss_scale", search["loss_scale"])
        validation.int_at_least("state_dict loss_scale_tracker", search["loss_scale_tracker"], 0)
    if "trial_skipping" in search:
        TrialSkipper.check(search["trial_skipping"])


def checked_state(
    saved: Any,
    param_groups: list[dict[str, Any]],
    saved_groups: list[dict[str, Any]],
    state: dict[Tensor, dict[str, Tensor]],
    local_shape: dict[int, torch.Size],
) -> tuple[dict[Tensor, dict[str, Tensor]], list[int], dict[str, Tensor]]:
    """The saved moments per parameter (matched by the ``params`` of ``saved_groups``, the state_dict's param groups
    that :func:`checked_groups` accepted; complete per the live ``state``, of the parameter's ``local_shape``, finite;
    ``exp_avg_sq`` also >= 0), the step count of each param group, and the optimizer-wide tensors kept in the first
    parameter's state."""
    if not isinstance(saved, dict):
        raise ValueError(f"state_dict entry 'state' must be a dict, got {type(saved).__name__}")
    first = param_groups[0]["params"][0]
    new_state, steps, tensors, i = {}, [], {}, 0
    for gi, (group, entry) in enumerate(zip(param_groups, saved_groups, strict=True)):
        group_steps = set()
        for p, key in zip(group["params"], entry["params"], strict=True):
            expected = set(state[p])
            st = saved.get(key, saved.get(str(key)))
            if not isinstance(st, dict) or set(st) != expected:
                raise ValueError(f"state_dict has no complete state for parameter {i} (expected {sorted(expected)})")
            moments = {}
            for name, t in st.items():
                t = local_tensor(t)
                if name == "step":
                    group_steps.add(validation.step_value(t, i))
                elif p is first and name not in MOMENTS:
                    tensors[name] = t
                else:
                    moments[name] = _checked_moment(name, t, local_shape[id(p)], i)
            new_state[p] = moments
            i += 1
        if len(group_steps) > 1:
            raise ValueError(f"state_dict param group {gi} holds different steps {sorted(group_steps)}")
        steps.append(group_steps.pop())
    return new_state, steps, tensors


def _checked_moment(name: str, t: Any, shape: torch.Size, index: int) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != shape:
        raise ValueError(
            f"state_dict entry {name!r} of parameter {index} does not match its shape (or is not floating point)"
        )
    bad = ~torch.isfinite(t) | (t < 0) if name == "exp_avg_sq" else ~torch.isfinite(t)
    if bool(bad.any()):
        value = t[bad].flatten()[0].item()
        what = "finite and >= 0" if name == "exp_avg_sq" else "finite"
        raise ValueError(f"state_dict entry {name!r} of parameter {index} must be {what}, holds {value!r}")
    return t
