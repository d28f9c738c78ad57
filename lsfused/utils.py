"""Saving parts of a model whose parameters an lsfused optimizer keeps in flat buffers.

An lsfused optimizer re-points every parameter into one flat buffer per (device, dtype), so each parameter is a
view of that buffer. ``torch.save`` writes a tensor's whole storage, hence ``torch.save(model.fc.state_dict())``
writes the whole model; ``unshared`` gives each tensor its own storage first. Savers that write each tensor's own
bytes already save views at their own size: ``safetensors.torch.save_file`` and Hugging Face ``save_pretrained``
(its default safetensors format). ``safetensors.torch.save_model`` refuses tensors that share a storage none of them
covers: use :func:`save_model` here (or ``save_file(unshared(model.state_dict()), path)``), and load with
``model.load_state_dict(safetensors.torch.load_file(path))``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor


def _owns_storage(t: Tensor) -> bool:
    """Whether ``t`` covers its storage exactly (saving it writes no other tensor's bytes)."""
    return (
        t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def unshared(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` in which every tensor that is a view of a larger storage (a parameter in an lsfused
    flat buffer, or any other view) is cloned into its own storage, so ``torch.save`` writes it at its own size.

    Tensors that already own their storage and non-tensor entries are kept as they are (not copied); the
    ``_metadata`` attribute of a module's state dict (used by ``load_state_dict``) is carried over.
    """
    out = OrderedDict()
    for key, value in state_dict.items():
        if isinstance(value, Tensor) and not _owns_storage(value):
            value = value.detach().clone(memory_format=torch.contiguous_format)
        out[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def save_model(model: torch.nn.Module, filename: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_model`` for models trained with an lsfused optimizer: the model's state dict in
    safetensors format, every tensor at its own size; tied weights are written once (under the first name)."""
    from safetensors.torch import save_file

    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    tensors = {}
    for key, value in model.state_dict().items():
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if where in seen:  # the same tensor under two names (tied weights)
            continue
        seen[where] = key
        tensors[key] = value
    save_file(unshared(tensors), os.fspath(filename), metadata={"format": "pt", **(metadata or {})})
