"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for models too
large to keep whole on every GPU.

DDP keeps a full copy of the weights, gradients and AdamW's two moments on each process: 16 bytes
per parameter, 24 GB for GPT-2 XL (1.5B) before a single activation. FSDP splits each of them
across the N processes (16/N bytes per parameter) and gathers one block's weights just before it
runs, freeing them after: the same arithmetic and, up to the order of floating-point sums, the
same losses as DDP, for a little more communication. :class:`~minigpt.train.Trainer` picks it
with ``TrainConfig.parallel = "fsdp"`` (``--parallel fsdp`` on the command line).

Checkpoints stay in the one format of :mod:`minigpt.checkpoint`: the shards are gathered into
full tensors on rank 0 when saving and cut again when loading, so a run saved under FSDP
resumes under DDP or on one process, and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from minigpt.model import GPT

#: Gathered to full tensors, on the CPU, on rank 0 only (the others get empty dicts).
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
#: Every rank passes the full tensors it read; each keeps its own shard.
_SCATTER = StateDictOptions(full_state_dict=True)


def shard_model(model: GPT) -> GPT:
    """Shard ``model`` in place: each Transformer block is one unit (gathered for its forward and
    backward, then freed), the embeddings, final norm and head the root unit. Call it before the
    optimizer is made: the parameters become distributed tensors."""
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own numbering (group after group), which
    is how ``optimizer.state_dict()`` and our checkpoints key their state."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full model and optimizer state dicts of a sharded model, in the formats of
    ``model.state_dict()`` and ``optimizer.state_dict()``. Every rank must call it (it gathers);
    rank 0 gets the tensors, the others empty dicts."""
    weights = get_model_state_dict(model, options=_GATHER)
    by_name = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not by_name:
        return weights, {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]]
    return weights, {"state": {index[name]: s for name, s in by_name["state"].items()}, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict[str, Any],
                    optimizer_state: dict[str, Any] | None = None) -> None:
    """Load full state dicts (as :func:`full_state` returns them, or a checkpoint holds them)
    into a sharded model and its optimizer; every rank passes the same full tensors."""
    set_model_state_dict(model, weights, options=_SCATTER)
    if optimizer is None or optimizer_state is None:
        return
    names = _param_names(model, optimizer)
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]]
    by_name = {"state": {names[int(i)]: s for i, s in optimizer_state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=_SCATTER)
