"""Helpers that split a model's parameters into PLASLS components."""

from __future__ import annotations

import math
import re

from torch import Tensor, nn


def _unique(params) -> list[Tensor]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def by_layers(model: nn.Module, n: int) -> list[list[Tensor]]:
    """Split the parameters into ``n`` contiguous components of modules, balanced by parameter count.

    Modules that own parameters are taken in registration order and kept whole; fewer than ``n`` components come
    back when the model has fewer such modules.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    blocks, seen = [], set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            blocks.append(own)
    if not blocks:
        raise ValueError("the model has no parameters")
    n = min(n, len(blocks))
    total = sum(p.numel() for b in blocks for p in b)
    comps: list[list[Tensor]] = [[]]
    done = 0
    for i, block in enumerate(blocks):
        remaining_blocks = len(blocks) - i
        need_new = comps[-1] and (done >= total * len(comps) / n or remaining_blocks <= n - len(comps))
        if need_new and len(comps) < n:
            comps.append([])
        comps[-1].extend(block)
        done += sum(p.numel() for p in block)
    return comps


def bert_components(model: nn.Module, include_pooler: bool = True) -> list[list[Tensor]]:
    """The paper's split of a Hugging Face BERT-style model: embeddings, encoder layers in 8 parts, the rest.

    For 12 layers the encoder parts are {0,1},{2},{3,4},{5},{6,7},{8},{9,10},{11}
    (``range(ceil(1.5*(i-1)), ceil(1.5*i))``). Other depths use the same rule scaled, ``ceil(L*i/8)``, keeping only
    the distinct bounds: a model with 8 layers or fewer gets one part per layer, a deeper one 8 contiguous parts
    of ``L/8`` layers, rounded; no part is ever empty (the authors' hard-coded lists assume 12 layers, so on 6
    layers four of their ten lists are empty). Everything that is neither embeddings nor an encoder layer (pooler,
    classifier) forms the head, the last component.

    Args:
        model: a BERT-style model (parameters named ``*embeddings.*`` and ``*encoder.layer.N.*``).
        include_pooler (bool, default True): put the pooler (``*pooler.*``) into the head. With False the pooler's
            parameters are in no component, so an optimizer built on these components leaves them at their
            pretrained values, as the authors' experiments did (their parameter lists never name the pooler; set
            ``requires_grad_(False)`` on them to also save their gradient). The default trains every parameter,
            as a user who passes a model expects, and trained better on the MiniLM demo task (one seed,
            PLASLS at today's defaults, train loss / test accuracy: 0.682 / 0.895 on the authors' parameter lists,
            pooler frozen; 0.035 / 0.9175 on these components, pooler trained; the splits differ otherwise too).
    """
    if not isinstance(include_pooler, bool):
        raise ValueError(f"include_pooler must be True or False, got {include_pooler!r}")
    layer_re = re.compile(r"(?:^|\.)encoder\.layers?\.(\d+)\.")
    embeddings, layers, head = [], {}, []
    for name, p in model.named_parameters():
        match = layer_re.search(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(p)
        elif "embeddings." in name:
            embeddings.append(p)
        elif include_pooler or not re.search(r"(?:^|\.)pooler\.", name):
            head.append(p)
    if not layers or not embeddings:
        raise ValueError("not a BERT-style model: expected parameters named '*embeddings.*' and '*encoder.layer.N.*'")
    depth = max(layers) + 1
    bounds = sorted({math.ceil(depth * i / 8) for i in range(9)})
    comps = [_unique(embeddings)]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
        comps.append(_unique(p for i in range(lo, hi) for p in layers.get(i, [])))
    if head:
        comps.append(_unique(head))
    return [c for c in comps if c]
