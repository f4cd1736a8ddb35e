"""LoRA (Hu et al. 2021): fine-tune a few low-rank matrices instead of every weight.

A frozen linear layer ``y = x W^T + b`` gets a trainable detour of rank ``r``::

    y = x W^T + b + (alpha / r) * x A^T B^T        A: (r, in), B: (out, r)

``B`` starts at zero, so the adapted model starts exactly at the base model, and only
``r * (in + out)`` numbers per layer train instead of ``in * out``. Scaling by ``alpha / r`` keeps
the size of the update about the same when you try another rank, so the learning rate carries over.

After training, :func:`merge` folds ``(alpha / r) B A`` into ``W``: the model is then an ordinary
GPT again, with no extra cost at inference. :func:`unmerge` takes it back out.

:class:`LoRALinear` keeps the wrapped layer's ``weight`` and ``bias`` under their own names, so a
plain GPT's state dict loads into a model with adapters (``strict=False``: only the adapters are
missing), and the adapters alone -- a few kilobytes -- are saved and shared with :func:`save_lora`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.checkpoint import read_safetensors, write_safetensors

__all__ = [
    "DEFAULT_TARGETS",
    "LoRALinear",
    "apply_lora",
    "load_lora",
    "lora_layers",
    "lora_state_dict",
    "merge",
    "save_lora",
    "trainable_fraction",
    "unmerge",
]

# Every linear layer of every block: attention's c_attn and c_proj, the MLP's c_fc and c_proj
# ("c_proj" names both). See minigpt.sft.lora_settings for the measurement behind the choice.
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")


class LoRALinear(nn.Module):
    """``base`` (frozen) plus a trainable low-rank update ``(alpha / r) * B @ A``."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, not {type(base).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r={r!r} must be a positive integer")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: no copy of the base model
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        # A as nn.Linear initialises its weight (as the LoRA reference code does); B = 0 makes the
        # update zero at the start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update LoRA adds to ``weight``: ``(alpha / r) * B @ A``, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (inference then costs one matmul, as without LoRA)."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of ``weight``, e.g. to train the adapters further."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, merged={self.merged}")


def _matches(name: str, targets: Sequence[str]) -> bool:
    """``targets`` are dotted name suffixes: "c_proj" matches both attn.c_proj and mlp.c_proj,
    "attn.c_proj" only the first."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, r: int = 8,
               alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each ``nn.Linear`` named by ``targets`` in a
    :class:`LoRALinear`, in place; returns ``model``. Afterwards only the adapters train.

    The output head (tied to the token embedding) is left alone unless named in ``targets``.
    """
    if isinstance(targets, str):
        targets = (targets,)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge or load into a fresh model instead")
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(name, targets)]
    if not chosen:
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches targets {list(targets)}; this model's linear layers "
                         f"are named {linears}")
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, r=r, alpha=alpha, dropout=dropout))
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every :class:`LoRALinear` in ``model`` with its qualified name."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter of ``model`` into its base weight (see :meth:`LoRALinear.merge`)."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (up to float rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters (a tied weight counts once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: ``{"<layer>.lora_A": ..., "<layer>.lora_B": ...}`` (CPU copies)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if layer.merged:
            raise ValueError(f"{name} is merged into its base weight; unmerge(model) before saving the "
                             "adapters, or the base weight you load them onto would hold them twice")
        state[f"{name}.lora_A"] = layer.lora_A.detach().cpu().contiguous()
        state[f"{name}.lora_B"] = layer.lora_B.detach().cpu().contiguous()
    if not state:
        raise ValueError("the model has no LoRA adapters; call apply_lora(model, ...) first")
    return state


def save_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapters (and their rank and alpha) to a safetensors file, atomically."""
    state = lora_state_dict(model)  # refuses a model without adapters, or with merged ones
    _, first = next(lora_layers(model))
    return write_safetensors(path, state, {"format": "minigpt-lora", "r": str(first.r), "alpha": str(first.alpha)})


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters written by :func:`save_lora` into ``model`` (which has the same adapters,
    e.g. from :func:`apply_lora` with the same targets and rank); returns ``model``.

    Refuses, naming the file, adapters whose names or shapes differ from the model's.
    """
    tensors, meta = read_safetensors(path, "LoRA file")
    if meta.get("format") != "minigpt-lora":
        raise ValueError(f"{path} is not a minigpt LoRA file (save one with minigpt.lora.save_lora)")
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError(f"the model has no LoRA adapters to load {path} into; call apply_lora(model, "
                         f"r={meta.get('r')}, alpha={meta.get('alpha')}, targets=...) first")
    ours = {f"{name}.{part}": getattr(layer, part) for name, layer in layers.items()
            for part in ("lora_A", "lora_B")}
    missing, unexpected = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model's adapters: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; apply_lora with the targets the file was saved with")
    wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(p.shape)}" for k, p in ours.items()
             if tensors[k].shape != p.shape]
    if wrong:
        raise ValueError(f"{path} has adapters of other shapes than this model's ({'; '.join(wrong[:3])}); "
                         f"it was saved with rank r={meta.get('r')}: apply_lora with that rank and a base "
                         "model of the same size")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge(model) before loading other adapters")
        scale = float(meta.get("alpha", layer.alpha)) / float(meta.get("r", layer.r))
        if not math.isclose(scale, layer.scaling):
            raise ValueError(f"{path} was saved with alpha/r = {scale:g}, but this model's adapters use "
                             f"{layer.scaling:g}; apply_lora with alpha={meta.get('alpha')}")
    with torch.no_grad():
        for key, p in ours.items():
            p.copy_(tensors[key])
    return model
