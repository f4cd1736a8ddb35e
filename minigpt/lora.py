"""LoRA (Hu et al. 2021): fine-tune a few low-rank matrices instead of every weight.

A frozen linear layer ``y = x W^T + b`` gets a trainable detour of rank ``r``::

    y = x W^T + b + (alpha / r) * x A^T B^T        A: (r, in), B: (out, r)

``B`` starts at zero, so the adapted model starts exactly at the base model, and only
``r * (in + out)`` numbers per layer train instead of ``in * out``. Scaling by ``alpha / r`` is meant
to keep the size of the update about the same when you try another rank, so the learning rate
carries over; with Adam it does so only roughly (at ``cpu``, rank 16 stalled at the ``alpha / r``
where rank 4 learned: "How the recipes were chosen" in the book), so a recipe sets both.

After training, :func:`merge` folds ``(alpha / r) B A`` into ``W``: the model is then an ordinary
GPT again, with no extra cost at inference. :func:`unmerge` takes it back out.

:class:`LoRALinear` keeps the wrapped layer's ``weight`` and ``bias`` under their own names, so a
plain GPT's state dict loads into a model with adapters (``strict=False``: only the adapters are
missing), and the adapters alone -- a few kilobytes -- are saved and shared with :func:`save_lora`.

Two more knobs of PEFT's LoRA, because adapters on the linear layers cannot reach everything a
new task needs:

* ``token_rows`` (PEFT's ``trainable_token_indices``): a few rows of the token embedding train
  too, as a correction :class:`TokenRows` adds to the frozen table. The embedding is tied to the
  output head, so the rows change what the model reads *and* what it predicts. New tokens (the
  chat tokens) and tokens the pretraining text rarely used (digits in Shakespeare) have poor rows
  that no adapter downstream can fix.
* ``train_also`` (PEFT's ``modules_to_save``): small modules that train in full, e.g. the
  LayerNorms or the position embedding.

The adapters carry no weight decay (:meth:`LoRALinear.no_decay_parameters`; Hugging Face's
Trainer, which PEFT's examples use, decays nothing by default): decaying ``A`` and ``B`` pulls
the update towards zero from both sides (on arithmetic at ``cpu`` it cost most of what LoRA
learned: the book's page "How the recipes were chosen" has the numbers).
"""

from __future__ import annotations

import copy
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
    "TiedHead",
    "TokenRows",
    "apply_lora",
    "load_lora",
    "lora_layers",
    "lora_state_dict",
    "merge",
    "merged_state_dict",
    "save_lora",
    "trainable_fraction",
    "unmerge",
    "train_modules",
]

# Every linear layer of every block: attention's c_attn and c_proj, the MLP's c_fc and c_proj
# ("c_proj" names both). "How the recipes were chosen" in the book has the measurement behind the choice.
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

    def no_decay_parameters(self) -> tuple[nn.Parameter, ...]:
        """The parameters an optimizer should not decay (see the module docstring):
        :func:`minigpt.train.make_optimizer` asks every module for them."""
        return (self.lora_A, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update LoRA adds to ``weight``: ``(alpha / r) * B @ A``, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # y + scaling * (x A^T) B^T as one addmm: no separate scaled (tokens, out) tensor to add.
        low = self.lora_dropout(x) @ self.lora_A.t()
        return torch.addmm(y.reshape(-1, self.out_features), low.reshape(-1, self.r), self.lora_B.t(),
                           alpha=self.scaling).view_as(y)

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


class TokenRows(nn.Module):
    """A frozen token embedding plus trainable corrections to the rows of ``token_ids``.

    The table the model uses is ``weight`` with ``delta[i]`` added to row ``token_ids[i]``;
    ``delta`` starts at zero (the model starts exactly as the base), so weight decay pulls the rows
    back towards their pretrained values, not towards zero.
    """

    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int]) -> None:
        super().__init__()
        ids = sorted({int(i) for i in token_ids})
        vocab = embedding.num_embeddings
        if not ids or ids[0] < 0 or ids[-1] >= vocab:
            raise ValueError(f"token_rows must be token ids in [0, {vocab}), got {list(token_ids)[:8]}")
        self.weight = embedding.weight  # the same Parameter: the output head stays tied to it
        self.weight.requires_grad_(False)
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=self.weight.device))
        self.delta = nn.Parameter(torch.zeros(len(ids), self.weight.size(1), device=self.weight.device,
                                              dtype=self.weight.dtype))
        self.merged = False

    def table(self) -> torch.Tensor:
        """The embedding the model uses: the base rows with the corrections added."""
        if self.merged:
            return self.weight
        return self.weight.index_add(0, self.token_ids, self.delta.to(self.weight.dtype))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.table())

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.index_add_(0, self.token_ids, self.delta.to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.index_add_(0, self.token_ids, -self.delta.to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{self.delta.size(0)} trainable rows of {tuple(self.weight.shape)}, merged={self.merged}"


class TiedHead(nn.Module):
    """The output head of a GPT whose embedding is a :class:`TokenRows`: it multiplies by the
    same table, corrections included, as the tied head of a plain GPT does."""

    def __init__(self, rows: TokenRows) -> None:
        super().__init__()
        self.weight = rows.weight  # keeps the state-dict name lm_head.weight, tied as before
        self._rows = (rows,)  # a reference, not a submodule: the embedding owns the rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._rows[0].table())


def _matches(name: str, targets: Sequence[str]) -> bool:
    """``targets`` are dotted name suffixes: "c_proj" matches both attn.c_proj and mlp.c_proj,
    "attn.c_proj" only the first."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, r: int = 8,
               alpha: float = 16.0, dropout: float = 0.0, *, token_rows: Sequence[int] = (),
               train_also: Sequence[str] = ()) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each ``nn.Linear`` named by ``targets`` in a
    :class:`LoRALinear`, in place; returns ``model``. Afterwards only the adapters train, plus
    the embedding rows of the ids in ``token_rows`` (a GPT's tied embedding and head, see
    :class:`TokenRows`) and every parameter of the modules named by ``train_also``.

    Names are dotted suffixes ("c_proj" is both attn.c_proj and mlp.c_proj). An output head tied to
    the token embedding (a GPT's ``lm_head``) cannot be a target: merging its update would change the
    embedding too; ``token_rows`` adapts both together. No ``targets`` with some ``token_rows`` trains
    those rows alone (prompt tuning's soft tokens, :func:`minigpt.peft.soft_prompt`).
    """
    if isinstance(targets, str):
        targets = (targets,)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge or load into a fresh model instead")
    # Every check before the first change, so that a refused call leaves the model as it was.
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(name, targets)]
    if not chosen and (targets or not len(token_rows)):
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches targets {list(targets)}; this model's linear layers "
                         f"are named {linears}")
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    tied = [name for name, linear in chosen if linear.weight is getattr(wte, "weight", None)]
    if tied:
        raise ValueError(f"LoRA cannot adapt {tied[0]}: its weight is the token embedding (tied), so a merged "
                         "update would change what the model reads as well as what it predicts; use token_rows "
                         "for the rows that should train")
    if len(token_rows):
        head = getattr(model, "lm_head", None)
        if not isinstance(wte, nn.Embedding) or head is None or head.weight is not wte.weight:
            raise ValueError("token_rows needs a GPT whose token embedding (transformer.wte) is tied to "
                             "its output head (lm_head)")
    also = _parameters_of(model, train_also)
    rows = TokenRows(wte, token_rows) if len(token_rows) else None  # checks the ids

    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, r=r, alpha=alpha, dropout=dropout))
    if rows is not None:
        model.transformer.wte, model.lm_head = rows, TiedHead(rows)
    for p in also:
        p.requires_grad_(True)
    return model


def train_modules(model: nn.Module, names: Sequence[str]) -> None:
    """Let every parameter of the modules named by ``names`` (dotted suffixes, as ``"ln_1"``) train
    again in a frozen model: small modules beside the adapters, such as the LayerNorms."""
    for p in _parameters_of(model, names):
        p.requires_grad_(True)


def _parameters_of(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """The parameters of the modules named by ``names``, refusing a name that matches nothing or a
    module that holds the tied token embedding (it would train the whole table and the head)."""
    if isinstance(names, str):
        names = (names,)
    also = [(name, m) for name, m in model.named_modules() if name and _matches(name, names)]
    if names and not also:
        raise ValueError(f"no module matches train_also {list(names)}")
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    table = getattr(wte, "weight", None)
    for name, module in also:
        if module is wte or any(p is table for p in module.parameters()):
            raise ValueError(f"train_also cannot name {name}: it holds the token embedding, which is tied "
                             "to the output head; use token_rows for the rows that should train")
    return [p for _, module in also for p in module.parameters()]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every :class:`LoRALinear` in ``model`` with its qualified name."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def _mergeable(model: nn.Module) -> Iterator[tuple[str, LoRALinear | TokenRows]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear | TokenRows))


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter (and the token rows) of ``model`` into its base weights (see
    :meth:`LoRALinear.merge`)."""
    for _, layer in _mergeable(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (up to float rounding)."""
    for _, layer in _mergeable(model):
        layer.unmerge()
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model ``model`` adapts, with its adapters and token rows merged
    in (:func:`merge` on a copy): what a reader that knows nothing of LoRA, such as transformers,
    needs. ``model`` itself is left as it is, adapters unmerged."""
    merged = merge(copy.deepcopy(model))
    adapters = {f"{name}.{key}" for name, layer in _mergeable(merged)
                for key in (("lora_A", "lora_B") if isinstance(layer, LoRALinear) else ("delta", "token_ids"))}
    return {key: value for key, value in merged.state_dict().items() if key not in adapters}


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters (a tied weight counts once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`apply_lora` made trainable, alone (CPU copies): ``<layer>.lora_A`` and
    ``<layer>.lora_B``, the token rows' ``delta`` and ``token_ids``, and the ``train_also``
    modules' parameters."""
    if not any(True for _ in _mergeable(model)):
        raise ValueError("the model has no LoRA adapters; call apply_lora(model, ...) first")
    for name, layer in _mergeable(model):
        if layer.merged:
            raise ValueError(f"{name} is merged into its base weight; unmerge(model) before saving the "
                             "adapters, or the base weight you load them onto would hold them twice")
    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state.update((f"{name}.token_ids", m.token_ids) for name, m in model.named_modules() if isinstance(m, TokenRows))
    return {name: t.detach().cpu().contiguous() for name, t in state.items()}


def save_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapters (and their rank and alpha) to a safetensors file, atomically."""
    state = lora_state_dict(model)  # refuses a model without adapters, or with merged ones
    first = next((layer for _, layer in lora_layers(model)), None)  # none: token rows alone (prompt tuning)
    shape = {"r": str(first.r), "alpha": str(first.alpha)} if first is not None else {}
    return write_safetensors(path, state, {"format": "minigpt-lora", **shape})


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters written by :func:`save_lora` into ``model`` (which has the same adapters,
    e.g. from :func:`apply_lora` with the same targets and rank); returns ``model``.

    Refuses, naming the file, adapters whose names or shapes differ from the model's.
    """
    tensors, meta = read_safetensors(path, "LoRA file")
    if meta.get("format") != "minigpt-lora":
        raise ValueError(f"{path} is not a minigpt LoRA file (save one with minigpt.lora.save_lora)")
    layers = dict(lora_layers(model))
    if not any(True for _ in _mergeable(model)):
        raise ValueError(f"the model has no LoRA adapters to load {path} into; call apply_lora(model, "
                         f"r={meta.get('r')}, alpha={meta.get('alpha')}, targets=...) first")
    ours = {name: p for name, p in model.named_parameters() if p.requires_grad}
    ours.update((f"{name}.token_ids", m.token_ids) for name, m in model.named_modules() if isinstance(m, TokenRows))
    missing, unexpected = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model's adapters: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; apply_lora with the targets, token_rows and train_also the "
                         "file was saved with")
    wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(p.shape)}" for k, p in ours.items()
             if tensors[k].shape != p.shape]
    if wrong:
        raise ValueError(f"{path} has adapters of other shapes than this model's ({'; '.join(wrong[:3])}); "
                         f"it was saved with rank r={meta.get('r')}: apply_lora with that rank and a base "
                         "model of the same size")
    for name, layer in _mergeable(model):
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge(model) before loading other adapters")
    for layer in layers.values():
        scale = float(meta.get("alpha", layer.alpha)) / float(meta.get("r", layer.r))
        if not math.isclose(scale, layer.scaling):
            raise ValueError(f"{path} was saved with alpha/r = {scale:g}, but this model's adapters use "
                             f"{layer.scaling:g}; apply_lora with alpha={meta.get('alpha')}")
    with torch.no_grad():
        for key, p in ours.items():
            p.copy_(tensors[key])
    return model
