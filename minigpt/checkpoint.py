"""Checkpoints: one safetensors file holding everything a killed run needs to resume exactly.

Model weights, optimizer moments, RNG states and the data position go into one file, written to a
temporary name and renamed into place, so a crash mid-write never leaves a half checkpoint; a tensor
holding NaN or infinity is never written, so a diverged run cannot replace its last good checkpoint.
Non-tensor state (configs, step, loader position, optimizer hyper-parameters) is JSON in the
file's metadata. No pickle is involved anywhere: loading a checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minigpt.data import give_default_mode
from minigpt.errors import MinigptError
from minigpt.model import GPT, GPTConfig

FORMAT = "minigpt-checkpoint"
VERSION = 1


class CheckpointError(MinigptError):
    """A checkpoint that must not be written (non-finite tensors) or built (a header claiming more
    than the file holds)."""


def _unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _model_tensors(model: GPT, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict() if state is None else state)
    if model.lm_head.weight is model.transformer.wte.weight:
        state.pop("lm_head.weight", None)  # tied: safetensors stores each tensor once
    return {f"model.{k}": v.detach().contiguous().cpu() for k, v in state.items()}


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *,
                    full_state: tuple[dict[str, Any], dict[str, Any]] | None = None, **state: Any) -> Path:
    """Write model (+ optimizer, RNG) and JSON-serialisable ``state`` atomically to ``path``.

    ``full_state``: the model's and optimizer's state dicts gathered from a sharded model
    (:func:`minigpt.fsdp.full_state`), written in place of ``model``'s and ``optimizer``'s own."""
    gpt = _unwrap(model)
    weights, optimizer_state = full_state or (None, optimizer.state_dict() if optimizer is not None else None)
    tensors = {**_model_tensors(gpt, weights), **_rng_tensors()}
    meta: dict[str, Any] = {"config": dataclasses.asdict(gpt.config), "state": state}
    if optimizer_state is not None:
        optim_tensors, meta["optimizer"] = _optimizer_tensors(optimizer_state)
        tensors.update(optim_tensors)
    return write_safetensors(path, tensors, {"format": FORMAT, "version": str(VERSION),
                                             "minigpt": json.dumps(meta)})


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically: to a temporary name, flushed to disk, then renamed
    into place, so a crash mid-write leaves the old file (or none), never half a file.

    Refused if a floating-point tensor holds NaN or infinity: the file in place (a run's last good
    checkpoint) is worth more than a copy of diverged weights. The temporary name carries the
    process id, so two writers of one path never write into each other's file."""
    path = Path(path)
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to write {path}: {len(bad)} of its tensors hold NaN or infinity "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); training has diverged, "
                              "and the file there (if any) keeps the last finite state. Lower the learning rate "
                              "or clip gradients, and train again")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        give_default_mode(tmp)  # safetensors writes 0o600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when something above failed
    return path


def read_safetensors(path: str | os.PathLike, what: str, *,
                     tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (none with ``tensors=False``: the header alone is cheap) and metadata of a
    safetensors file; a missing or damaged file raises an error naming it as ``what``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{path} is not a readable {what} ({err}); it may be truncated: "
                         "delete it, or resume from an earlier one") from err
    return loaded, header


def _open(path: Path, *, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    loaded, header = read_safetensors(path, "checkpoint", tensors=tensors)
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a minigpt checkpoint "
                         "(for transformers' GPT-2 weights use GPT.from_hf_state_dict)")
    if int(header["version"]) > VERSION:
        raise ValueError(f"{path} has checkpoint version {header['version']}; upgrade minigpt to read it")
    try:
        return loaded, json.loads(header["minigpt"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has a damaged header ({err!r}): train it again, or use another file") from None


def checkpoint_config(path: str | os.PathLike) -> GPTConfig:
    """The model config stored in a checkpoint, read from its header without loading tensors, and
    checked against the tensors the file holds: a damaged or crafted header cannot make a caller
    allocate a model larger than the file (safetensors itself checks each tensor's size against it)."""
    path = Path(path)
    meta = _open(path, tensors=False)[1]
    try:
        config = GPTConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has a damaged model config in its header ({err!r}): train it again, or use "
                              "another file") from None
    with torch.device("meta"):  # shapes without memory
        claimed = GPT(config).num_params(non_embedding=False)
    with safe_open(str(path), framework="pt") as f:
        held = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model."))
    if claimed > held:
        raise CheckpointError(f"{path} claims a model of {claimed:,} parameters ({claimed * 4 / 1e9:.3g} GB in "
                              f"float32) but holds {held:,} weights: it is damaged or not a minigpt checkpoint; "
                              "train it again, or use another file")
    return config


def checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The training state stored in a checkpoint (step, loader position, ...), read from its
    header without loading tensors: enough to tell a finished run from an interrupted one."""
    return _open(Path(path), tensors=False)[1]["state"]


@dataclasses.dataclass
class CheckpointContents:
    """What a checkpoint file holds, as full (unsharded) CPU tensors."""

    path: Path
    config: GPTConfig
    weights: dict[str, torch.Tensor]  # the model's state dict (a tied head stored once)
    optimizer: dict[str, Any] | None  # in the format of ``optimizer.state_dict()``; None if not saved
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]  # what the caller saved with it: step, loader position, ...

    def restore_rng(self) -> None:
        """Put the CPU's and GPUs' random number generators where they stood at the save."""
        torch.set_rng_state(self.rng["rng.cpu"])
        cuda = [self.rng[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in self.rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)

    def resumable_optimizer(self) -> dict[str, Any]:
        """The optimizer state, which resuming training needs: an error naming the file if it has none."""
        if self.optimizer is None:
            raise ValueError(f"{self.path} has no optimizer state; it cannot resume training")
        return self.optimizer


def read_checkpoint(path: str | os.PathLike) -> CheckpointContents:
    """Everything in the checkpoint at ``path``, its header checked first (:func:`checkpoint_config`)."""
    path = Path(path)
    checkpoint_config(path)
    tensors, meta = _open(path)
    return CheckpointContents(
        path=path, config=GPTConfig(**meta["config"]),
        weights={k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
        optimizer=_optimizer_state(tensors, meta["optimizer"]) if "optimizer" in meta else None,
        rng={k: v for k, v in tensors.items() if k.startswith("rng.")}, state=meta["state"])


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, *,
                    restore_rng: bool = False) -> tuple[GPT, dict[str, Any]]:
    """Load a checkpoint into ``model`` (built from the stored config when None) and ``optimizer``.

    Returns the model and the ``state`` saved with it (step, loader position, ...).
    """
    path = Path(path)
    contents = read_checkpoint(path)
    gpt = GPT(contents.config) if model is None else _unwrap(model)
    if gpt.config != contents.config:
        raise ValueError(f"{path} holds a model with config {contents.config}, not {gpt.config}")
    missing, unexpected = gpt.load_state_dict(contents.weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{path} does not match the model: missing {missing}, unexpected {unexpected}")
    if optimizer is not None:
        optimizer.load_state_dict(contents.resumable_optimizer())
    if restore_rng:
        contents.restore_rng()
    return gpt, contents.state


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
